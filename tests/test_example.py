"""examples/order_choreography.py prints exactly the output of the article it retells."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "order_choreography.py"
SEEDS = REPO.parent / "shared" / "seeds"

EXPECTED = [
    "OrderService: Creating order 1",
    "OrderService: Order 1 created",
    "InventoryService: Checking inventory for order 1",
    "InventoryService: Inventory checked for order 1",
    "PaymentService: Processing payment for order 1",
    "PaymentService: Payment processed for order 1",
    "ShippingService: Arranging shipping for order 1",
    "ShippingService: Shipping arranged for order 1",
]


def test_expected_lines_are_the_articles() -> None:
    (seed,) = SEEDS.glob("003_*.txt")
    assert "\n".join(EXPECTED) in seed.read_text()


def test_example_prints_the_articles_output() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=10, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(line + "\n" for line in EXPECTED)
    assert proc.stderr == ""
