"""What the paper reports, as far as it is known (tags as in the protocol docs: [P] the paper's own
text, [S] a secondary summary; see docs/protocol.md, "The paper's protocol").

Each finding is a comparison the harness can repeat: a direction (``lower``: the second value is
below the first) between two conditions, or a level at one test point."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    key: str
    what: str
    paper: str  # the paper's number(s) as reported
    source: str  # [P] / [S]


FINDINGS = (
    Finding("depth", "Iris depth sweep (width 16): Spearman falls with depth", "falls beyond ~5 layers", "[S]"),
    Finding("width", "Iris width sweep (depth 2): Spearman from width 8 to 50", "0.82 -> 0.56", "[S]"),
    Finding("weight-decay", "Iris with vs without weight decay (depth 2, width 16)", "0.97 vs 0.508", "[S]"),
    Finding("test-points", "highest-loss vs median-loss test point (one model)", "0.92 vs 0.38", "[S]"),
    Finding("curvature", "top Hessian eigenvalue at theta* vs depth (Iris, width 16)", "grows with depth", "[S]"),
    Finding("lissa", "LiSSA vs the exact Hessian, Iris depth sweep (exact minus lissa)",
            "LiSSA a little worse, more so when deeper", "[S]"),
    Finding("mnist-cnn", "small MNIST CNN, highest-loss test point, Pearson/Spearman (Table 1)", "0.95/0.87", "[S]"),
)
PAPER_WIDTH = {8: 0.82, 50: 0.56}
PAPER_WEIGHT_DECAY = {"on": 0.97, "off": 0.508}
PAPER_TEST_POINTS = {"highest": 0.92, "median": 0.38}
PAPER_MNIST_CNN = {"pearson": 0.95, "spearman": 0.87}


def finding(key: str) -> Finding:
    return next(f for f in FINDINGS if f.key == key)
