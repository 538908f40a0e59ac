"""Session-wide fixtures: the private servers of tests/servers/, one module per backend."""

# Each backend's module adds its fixtures here as it lands.
pytest_plugins: list[str] = [
    "tests.servers.amqp",
    "tests.servers.nats",
    "tests.servers.postgres",
    "tests.servers.redis",
]
