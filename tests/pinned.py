"""The pinned accuracy matrices of every strategy: split digits, seed 0, one CPU thread, bit for bit.

``tests/test_end_to_end.py`` checks that every strategy still gives them. A change that alters results on
purpose regenerates them, and says so in its commit:

    python tests/pinned.py            # rewrites tests/data/pinned_split_digits.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from helpers import ROOT, run_experiment  # noqa: E402

PINNED = ROOT / "tests" / "data" / "pinned_split_digits.json"
STRATEGIES = sorted(p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml"))


def pinned_overrides(strategy: str) -> tuple[str, ...]:
    return f"strategy={strategy}", "threads=1"


def matrices_of(results) -> dict[str, list[list[float]]]:
    return {f"{t}/{s}": results.matrices[t, s].tolist() for t in results.tracks for s in ("class_il", "task_il")}


def pinned(strategy: str) -> dict[str, list[list[float]]]:
    with tempfile.TemporaryDirectory() as folder:
        results, _ = run_experiment(Path(folder), *pinned_overrides(strategy))
    return matrices_of(results)


if __name__ == "__main__":
    PINNED.write_text(json.dumps({strategy: pinned(strategy) for strategy in STRATEGIES}) + "\n")
    print(f"{PINNED}: {len(STRATEGIES)} strategies")
