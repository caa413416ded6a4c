"""``influence-bench paper``: Basu, Pope & Feizi (ICLR 2021) reproduced under its own protocol and
under the converged one, side by side with the paper's numbers (``numbers.py``), the retraining
horizon as an axis (``study.horizon``), tables with verdicts (``tables.py``) and figures
(``figures.py``)."""
