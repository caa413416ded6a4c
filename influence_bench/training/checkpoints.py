"""Training checkpoints for trajectory-based estimators (TracIn, TRAK): evenly spaced iterates of
the fit, each with the learning-rate weight it stands for, recorded without changing the run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Checkpoints:
    """Evenly spaced iterates of the L-BFGS run, each with its learning-rate weight.

    L-BFGS has no learning rate, so each iteration ``theta_{s+1} = theta_s + delta_s`` gets its
    **gradient-descent-equivalent step size** ``eta_s = -<delta_s, g_s> / ||g_s||^2`` (``g_s`` the
    gradient of the training objective at ``theta_s``): the learning rate for which a plain
    gradient step ``-eta_s g_s`` decreases the objective by the same first-order amount. A
    checkpoint stands for the iterations since the previous one (as TracInCP's end-of-epoch
    checkpoints stand for their epoch): its weight ``lr`` is the sum of ``eta_s`` over those
    iterations. At most ``max_keep`` iterates are kept, at multiples of a stride that doubles
    whenever the buffer fills (``max_keep/2`` to ``max_keep`` of them, whatever the run length).
    The final checkpoint is theta* itself; its weight covers the L-BFGS iterations after the last
    kept iterate plus the Newton polish, counted as one step from the L-BFGS end point to theta*.
    """

    thetas: torch.Tensor  # [K, P] kept L-BFGS iterates (theta* not included)
    steps: np.ndarray  # [K] their L-BFGS iteration numbers (0 = initialisation, never kept)
    lrs: np.ndarray  # [K] learning-rate weight of each kept iterate
    final_lr: float  # learning-rate weight of theta*
    n_lbfgs: int  # L-BFGS iterations in the run
    replay_diff: float | None = None  # for replayed entries: max |theta*_replay - theta*_cache|

    def as_list(self, theta_star: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
        out = [(t, float(lr)) for t, lr in zip(self.thetas, self.lrs)]
        return out + [(theta_star, float(self.final_lr))]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"ckpt_theta": self.thetas.detach().cpu().numpy(), "ckpt_step": np.asarray(self.steps, np.int64),
                "ckpt_lr": np.asarray(self.lrs, np.float64), "ckpt_final_lr": np.float64(self.final_lr),
                "ckpt_n_lbfgs": np.int64(self.n_lbfgs)}

    @classmethod
    def from_arrays(cls, z: dict[str, np.ndarray], device, dtype, n_params: int | None = None) -> "Checkpoints":
        """The checkpoints stored in ``z`` (``to_arrays``); ``ValueError`` saying what is wrong when
        they are missing or malformed (``arrays_problem``)."""
        problem = arrays_problem(z, n_params) or (None if all(k in z for k in ARRAY_KEYS) else "no checkpoint arrays")
        if problem:
            raise ValueError(problem)
        return cls(torch.as_tensor(z["ckpt_theta"]).to(device, dtype), z["ckpt_step"], z["ckpt_lr"],
                   float(z["ckpt_final_lr"]), int(z["ckpt_n_lbfgs"]))


ARRAY_KEYS = ("ckpt_theta", "ckpt_step", "ckpt_lr", "ckpt_final_lr", "ckpt_n_lbfgs")


def arrays_problem(z: dict[str, np.ndarray], n_params: int | None = None, dtype: np.dtype | None = None,
                   meta: dict | None = None) -> str | None:
    """What is wrong with the checkpoint arrays of ``z`` (``Checkpoints.to_arrays``), or None when they
    are well formed or absent altogether (an entry written before checkpoints existed). ``n_params``
    and ``dtype``: theta*'s; ``meta``: the ``checkpoints`` record of the entry's sidecar, which the
    arrays must agree with."""
    present = [k for k in ARRAY_KEYS if k in z]
    if not present:
        return None
    if len(present) != len(ARRAY_KEYS):
        return f"checkpoint arrays {sorted(set(ARRAY_KEYS) - set(present))} missing"
    th, st, lr, flr, nl = (np.asarray(z[k]) for k in ARRAY_KEYS)
    if th.dtype.kind != "f" or th.ndim != 2 or (n_params is not None and th.shape[1] != n_params) \
            or (dtype is not None and th.dtype != dtype):
        return (f"ckpt_theta is {th.dtype} {list(th.shape)}, expected "
                f"{dtype or 'float'} [K, {n_params if n_params is not None else 'P'}]")
    k = th.shape[0]
    if st.dtype.kind not in "iu" or st.shape != (k,) or (k and st.min() < 0):
        return f"ckpt_step is {st.dtype} {list(st.shape)}, expected {k} non-negative integers"
    if lr.dtype.kind != "f" or lr.shape != (k,):
        return f"ckpt_lr is {lr.dtype} {list(lr.shape)}, expected {k} floats"
    if flr.dtype.kind != "f" or flr.shape != () or nl.dtype.kind not in "iu" or nl.shape != () or int(nl) < 0:
        return f"ckpt_final_lr / ckpt_n_lbfgs are {flr.dtype} {list(flr.shape)} / {nl.dtype} {list(nl.shape)}"
    if not (np.isfinite(th).all() and np.isfinite(lr).all() and np.isfinite(flr)):
        return "non-finite checkpoint values"
    if meta is not None:
        try:
            agrees = ([int(v) for v in meta["steps"]] == st.tolist() and [float(v) for v in meta["lrs"]] == lr.tolist()
                      and float(meta["final_lr"]) == float(flr) and int(meta["n_lbfgs"]) == int(nl))
        except (KeyError, TypeError, ValueError):
            agrees = False
        if not agrees:
            return "checkpoint arrays disagree with the sidecar's checkpoint record"
    return None


class TrajectoryRecorder:
    """Keeps evenly spaced iterates of an optimiser run (at most ``max_keep``) and the running
    sum of the per-iteration step sizes ``eta_s`` (see ``Checkpoints``)."""

    def __init__(self, max_keep: int = 10):
        if max_keep < 2:
            raise ValueError("max_keep must be >= 2")
        self.max_keep = max_keep
        self.stride = 1
        self.kept: list[tuple[int, torch.Tensor]] = []
        self.cum_lr = [0.0]  # cum_lr[s] = sum of eta over iterations 0 .. s-1
        self.theta_end: torch.Tensor | None = None  # last L-BFGS iterate (set by ``fit``)
        self.fixed: "Checkpoints | None" = None  # minibatch training hands its checkpoints over whole

    def step(self, before: torch.Tensor, after: torch.Tensor, grad: torch.Tensor) -> None:
        gg = float(grad.dot(grad))
        eta = -float((after - before).dot(grad)) / gg if gg > 0 else 0.0
        self.cum_lr.append(self.cum_lr[-1] + eta)
        s = len(self.cum_lr) - 1
        if s % self.stride == 0:
            self.kept.append((s, after.detach().clone()))
        if len(self.kept) > self.max_keep:
            self.stride *= 2
            self.kept = [(k, t) for k, t in self.kept if k % self.stride == 0]

    def finish(self, theta_end: torch.Tensor, theta_star: torch.Tensor, grad_end: torch.Tensor) -> Checkpoints:
        """Close the record: ``theta_end`` is the last L-BFGS iterate, ``theta_star`` the polished optimum."""
        gg = float(grad_end.dot(grad_end))
        polish = -float((theta_star - theta_end).dot(grad_end)) / gg if gg > 0 else 0.0
        steps = np.array([k for k, _ in self.kept], dtype=np.int64)
        cum = np.asarray(self.cum_lr)
        bounds = np.concatenate([[0], steps])
        lrs = cum[bounds[1:]] - cum[bounds[:-1]]
        final = float(cum[-1] - cum[bounds[-1]]) + polish
        P = theta_star.numel()
        thetas = (torch.stack([t for _, t in self.kept]) if self.kept
                  else theta_star.new_zeros(0, P))
        return Checkpoints(thetas, steps, lrs, final, len(self.cum_lr) - 1)


class _RecordingLBFGS(torch.optim.LBFGS):
    """``torch.optim.LBFGS`` that reports every accepted iterate to a ``TrajectoryRecorder``.

    It only reads: the trajectory is bit-for-bit that of the plain optimiser. An accepted step is
    the ``_add_grad`` call made outside the line search's trial evaluations. The gradient at each
    iterate is the one the optimiser itself computed (at the start of ``step`` or at the accepted
    trial point of the line search), so recording costs no extra evaluations.
    """

    def __init__(self, params, recorder: TrajectoryRecorder, grad_fn, **kw):
        super().__init__(params, **kw)
        self._recorder = recorder
        self._grad_fn = grad_fn  # fallback when a gradient was not seen
        self._in_trial = False
        self._trials: list[tuple[float, torch.Tensor]] = []
        self._g_current: torch.Tensor | None = None

    def _gather_flat_grad(self):
        g = super()._gather_flat_grad()
        if self._in_trial:
            self._trials[-1] = (self._trials[-1][0], g.detach().clone())
        else:  # start of ``step``: the gradient at the current iterate
            self._g_current = g.detach().clone()
        return g

    def _directional_evaluate(self, closure, x, t, d):
        self._trials.append((float(t), None))
        self._in_trial = True
        try:
            return super()._directional_evaluate(closure, x, t, d)
        finally:
            self._in_trial = False

    def _add_grad(self, step_size, update) -> None:
        if self._in_trial:
            return super()._add_grad(step_size, update)
        before = self._params[0].detach().clone()
        g = self._g_current if self._g_current is not None else self._grad_fn(before)
        super()._add_grad(step_size, update)
        t = float(step_size)
        seen = [gt for tt, gt in self._trials if tt == t and gt is not None]
        self._g_current = g if t == 0.0 else (seen[-1] if seen else None)
        self._trials = []
        self._recorder.step(before, self._params[0].detach(), g)
