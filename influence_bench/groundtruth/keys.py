"""Store keys: what a ground-truth entry's content hash covers (setting spec, ground-truth config,
data, theta*, engine version, replicate), and how a setting's replicates are keyed."""

from __future__ import annotations

from influence_bench.api.context import Context
from influence_bench.groundtruth import lds
from influence_bench.groundtruth.recipes import CEILING_METHOD, MINIBATCH_VERSION, n_replicates, recipe_for
from influence_bench.groundtruth.store import StoreKey
from influence_bench.models.init_weights import init_weights_sha256
from influence_bench.spec.settings import part_dict

KINDS = ("loo", "lds")


def data_fingerprint(ctx: Context) -> str:
    """sha256 of the train and test arrays (dtype, shape and bytes)."""
    return ctx.data_sha256


def store_key(ctx: Context, kind: str = "loo", lds_spec: lds.LdsSpec = lds.DEFAULT, replicate: int = 0) -> StoreKey:
    """The store key of one replicate (stochastic recipes: each replicate seed is its own key;
    deterministic ones have a single replicate and keys without one)."""
    if kind not in KINDS:
        raise ValueError(f"unknown ground-truth kind {kind!r}; known: {', '.join(KINDS)}")
    s = ctx.setting
    config = part_dict("ground_truth", s.ground_truth)
    if kind == "lds":
        config["lds"] = lds_spec.config()
    payload = {"spec_hash": s.spec_hash, "setting_version": s.version, "ground_truth": config,
               "data": data_fingerprint(ctx), "theta": ctx.theta_sha256, "engine": recipe_for(ctx).version}
    init = init_weights_sha256(s)
    if init is not None:  # theta* started from the user's weights
        payload["init_weights"] = init
    if recipe_for(ctx).stochastic:
        payload["minibatch_engine"] = MINIBATCH_VERSION
        payload["replicate"] = int(replicate)
    elif replicate:
        raise ValueError(f"setting {s.id!r}: its ground truth is deterministic and has no replicate {replicate}")
    return StoreKey(s.id, s.ground_truth.mode, kind, payload, int(ctx.data.x_test.shape[0]))


def replicate_keys(ctx: Context, kind: str = "loo", lds_spec: lds.LdsSpec = lds.DEFAULT) -> list[StoreKey]:
    return [store_key(ctx, kind, lds_spec, r) for r in range(n_replicates(ctx))]


def ceiling_method(ctx: Context) -> str:
    n = n_replicates(ctx)
    if not recipe_for(ctx).stochastic:
        return CEILING_METHOD
    return f"split-half Spearman-Brown over {n} replicates" if n > 1 else "unknown (one replicate)"
