"""Generate the replies of ``prompts/data/labelled_replies.jsonl`` with the Workbench API.

    python -m prompts.build_labelled_replies [--model default] [--out FILE] [--seed 0]

Deterministic (greedy decoding, seeded prompt draws, alpha assignment and split). Three
prompt sets of :data:`N_PER_SET` prompts each: harmful (the harmful set's validation split),
harmless (the English harmless validation split) and benign-but-alarming
(:func:`prompts.overrefusal`). Every prompt is answered in four ways:

* ``baseline``: the unmodified model;
* ``steered`` twice: alpha times the raw refusal direction r_l = mu_H - mu_B (the suite's
  steering unit) added at every block of the middle third, as the dose-response raw sweep
  does, once with a negative and once with a positive alpha; the nonzero alphas of the full
  profile's grid are dealt out so that each appears equally often in every prompt set;
* ``abliterated``: the weights orthogonalised against the unit refusal direction of the
  sweep's centre block (every residual writer, no norm preservation).

Prompts are split by prompt (seeded, per prompt set) into a development and a held-out half
before any label is read. Labels are written by a person (or an assistant) reading each
reply against the rubric in ``labelled_replies.md``; a rerun keeps the label of every row
whose (prompt, condition, alpha, reply) is unchanged and leaves new rows unlabelled.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prompts import DATA_DIR, PromptSet, overrefusal

OUT_FILE = DATA_DIR / "labelled_replies.jsonl"
N_PER_SET = 24
STEER_ALPHAS = (-2.0, -1.75, -1.5, -1.25, -1.0, -0.75, -0.5, -0.25,
                0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
"""The nonzero alphas of the full profile's raw grid (-2:2:0.25)."""
SPLIT_SEED = 20261203
"""Seed of the by-prompt development / held-out split (fixed before any label was read)."""
MAX_NEW_TOKENS = 48  # the full profile's
CONDITIONS = ("baseline", "steered", "abliterated")
PROMPT_SETS = ("harmful", "harmless", "overrefusal")


@dataclass(frozen=True)
class Row:
    """One generated reply and where it came from."""

    prompt: str
    reply: str
    condition: str
    alpha: float
    prompt_set: str
    split: str
    layers: str
    label: str | None = None

    def key(self) -> tuple[str, str, float, str]:
        return (self.prompt, self.condition, self.alpha, self.reply)

    def as_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "reply": self.reply, "condition": self.condition,
                "alpha": self.alpha, "prompt_set": self.prompt_set, "split": self.split,
                "layers": self.layers, "label": self.label}


def split_by_prompt(n: int, seed: int) -> list[str]:
    """``"dev"`` / ``"heldout"`` per prompt: a seeded half (dev gets the extra one)."""
    perm = np.random.default_rng(seed).permutation(n)
    dev = set(perm[: (n + 1) // 2].tolist())
    return ["dev" if i in dev else "heldout" for i in range(n)]


def deal_alphas(n: int, seed: int) -> list[tuple[float, float]]:
    """(negative, positive) alpha per prompt: each side's alphas dealt round-robin over a
    seeded permutation of the prompts, so each alpha appears n / 8 times (+-1)."""
    neg = [a for a in STEER_ALPHAS if a < 0]
    pos = [a for a in STEER_ALPHAS if a > 0]
    rng = np.random.default_rng(seed)
    order_n, order_p = rng.permutation(n).tolist(), rng.permutation(n).tolist()
    out_n, out_p = [0.0] * n, [0.0] * n
    for k, i in enumerate(order_n):
        out_n[i] = neg[k % len(neg)]
    for k, i in enumerate(order_p):
        out_p[i] = pos[k % len(pos)]
    return list(zip(out_n, out_p, strict=True))


def prompt_sets(bench: Any, n: int, seed: int) -> dict[str, PromptSet]:
    """The three prompt sets, ``n`` prompts each, drawn with ``seed``."""
    return {"harmful": bench.sample_harmful(bench.harmful_split.val, n),
            "harmless": bench.sample_harmless(bench.harmless_split.val, n),
            "overrefusal": overrefusal().sample(n, seed, "category")}


def generate_rows(bench: Any, n_per_set: int = N_PER_SET, seed: int = 0,
                  max_new_tokens: int = MAX_NEW_TOKENS) -> list[Row]:
    """Every reply of the design (see the module docstring), unlabelled."""
    from probes.abliteration import orthogonalised
    from probes.dose_response import centre_block, middle_third
    from probes.interventions import plan_raw

    lm = bench.lm
    blocks = middle_third(lm.n_layers)
    centre = centre_block(blocks)
    d = bench.refusal_directions
    span = f"{blocks[0]}-{blocks[-1]}"
    sets = prompt_sets(bench, n_per_set, seed)
    arms: list[tuple[PromptSet, str, Any]] = []
    where: list[tuple[str, str, float, list[int]]] = []  # set, condition, alpha, prompt idx
    for name, ps in sets.items():
        arms.append((ps, "none", None))
        where.append((name, "baseline", 0.0, list(range(len(ps)))))
        dealt = deal_alphas(len(ps), seed + PROMPT_SETS.index(name))
        for alpha in STEER_ALPHAS:
            idx = [i for i, pair in enumerate(dealt) if alpha in pair]
            if not idx:
                continue
            plan = plan_raw({k: d.raw[k] for k in blocks}, alpha)
            key = f"steer/raw/r={d.key()}/L{span}/alpha={alpha!r}"
            arms.append((ps.subset(idx, f"{ps.name}[alpha={alpha:g}]"), key, plan))
            where.append((name, "steered", alpha, idx))
    gens = bench.generate_steered(arms, max_new_tokens=max_new_tokens)
    direction = d.raw[centre]
    edit_key = f"abliterated/r={d.key(centre)}/L{centre}/all-writers"
    for name, ps in sets.items():
        def edit(ps_: PromptSet = ps) -> Any:
            return orthogonalised(lm.layout, direction, model=lm.model, source_layer=centre)

        arms.append((ps, edit_key, None))
        gens.append(bench.generate(ps, edit_key, edit, max_new_tokens=max_new_tokens))
        where.append((name, "abliterated", 0.0, list(range(len(ps)))))
    splits = {name: split_by_prompt(len(ps), SPLIT_SEED + PROMPT_SETS.index(name))
              for name, ps in sets.items()}
    rows: list[Row] = []
    for (name, cond, alpha, idx), g in zip(where, gens, strict=True):
        layers = {"baseline": "", "steered": span, "abliterated": str(centre)}[cond]
        for j, i in enumerate(idx):
            rows.append(Row(sets[name].texts[i], g.texts[j], cond, alpha, name,
                            splits[name][i], layers))
    return rows


def read_rows(path: Path) -> list[Row]:
    """The rows of a labelled-replies file (empty when the file does not exist)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            out.append(Row(r["prompt"], r["reply"], r["condition"], float(r["alpha"]),
                           r["prompt_set"], r["split"], r.get("layers", ""), r.get("label")))
    return out


def keep_labels(new: Sequence[Row], old: Sequence[Row]) -> list[Row]:
    """``new`` with the label of every row of ``old`` whose key is unchanged."""
    labels = {r.key(): r.label for r in old if r.label}
    return [Row(r.prompt, r.reply, r.condition, r.alpha, r.prompt_set, r.split, r.layers,
                labels.get(r.key())) for r in new]


def write_rows(path: Path, rows: Sequence[Row]) -> None:
    path.write_text("".join(json.dumps(r.as_json(), ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def _bench(args: argparse.Namespace) -> Any:
    """A Workbench on the full profile's settings for ``args.model``."""
    from fixtures.options import PROFILES, parse_alphas, parse_layers
    from fixtures.workbench import BenchConfig, Progress, Workbench
    from probes.cache import ActivationCache
    from probes.models import dtype_name, load, parse_dtype

    d = PROFILES["full"]
    dtype = parse_dtype(args.dtype, args.device)
    cfg = BenchConfig(
        models=(args.model,), layers=parse_layers("all"), alphas=parse_alphas(d.alphas),
        ratio_alphas=parse_alphas(d.ratio_alphas, name="--ratio-alphas", max_abs=10.0),
        n_train=d.n_train, n_eval=d.n_eval, n_gen=d.n_gen, max_new_tokens=MAX_NEW_TOKENS,
        n_boot=d.n_boot, seed=args.seed, device=args.device, dtype=dtype_name(dtype),
        cache_dir=args.cache_dir, use_cache=True, profile="full", chat_template="auto",
        batch_size=args.batch_size, defaults=d)
    lm = load(args.model, device=args.device, dtype=dtype, cache_dir=args.cache_dir)
    progress = Progress(lambda msg: print(msg, file=sys.stderr, flush=True))
    return Workbench(lm, cfg, ActivationCache(args.cache_dir), progress)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m prompts.build_labelled_replies",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--out", type=Path, default=OUT_FILE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-per-set", type=int, default=N_PER_SET)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    rows = keep_labels(generate_rows(_bench(args), args.n_per_set, args.seed),
                       read_rows(args.out))
    write_rows(args.out, rows)
    unlabelled = sum(r.label is None for r in rows)
    print(f"{len(rows)} replies written to {args.out}; {unlabelled} unlabelled",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
