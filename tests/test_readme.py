"""README.md must stay true: its opening commands exist, and its examples run as shown."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_opens_with_exactly_two_commands_that_name_real_tasks() -> None:
    first = re.match(r"```sh\n(.*?)```", README, re.S)
    assert first is not None, "README.md must open with a fenced sh block"
    commands = [line for line in first.group(1).splitlines() if line.strip()]
    assert commands == ["python3 scripts/dev.py demo", "python3 scripts/dev.py test"]
    script = (ROOT / "scripts" / "dev.py").read_text()
    assert '"demo":' in script
    assert '"test":' in script


def test_ci_runs_the_readme_test_command() -> None:
    assert "python3 scripts/dev.py test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs_and_prints_what_its_comments_say(code: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    # A comment that opens with an outcome's state says what the line above prints.
    for expected in re.findall(r"# ((?:completed|compensated|failed) .*)$", code, re.M):
        assert expected in done.stdout
    assert done.stdout.strip()


def test_there_is_an_example_of_each_style() -> None:
    assert any("Orchestrator(" in code for code in EXAMPLES), "no orchestration example"
    assert any("(Service)" in code for code in EXAMPLES), "no choreography example"


def test_the_durable_quick_start_runs_on_sqlite_in_a_temporary_folder() -> None:
    durable = [code for code in EXAMPLES if "sqlite:///" in code]
    assert durable, "README.md must show a durable quick start on SQLite"
    assert all("tempfile" in code for code in durable), "examples must not litter the checkout"


DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=[page.name for page in DOCS])
def test_relative_links_lead_to_files_that_exist(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_the_layout_names_every_adapter_module() -> None:
    # The layout listed the adapters' helpers by name, and six added since were missing.
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    adapters = ROOT / "src" / "sagakit" / "adapters"
    modules = sorted(p.stem for p in adapters.glob("*.py") if p.stem != "__init__")
    missing = [m for m in modules if not re.search(rf"(?<![\w]){m}(?![\w])", layout)]
    assert not missing, f"README.md's Layout does not name {missing}"
