"""The Mosaic GPU ragged kernel's hardware checks: which configurations, and how tight.

``benchmarks/gpu_check.py`` checks the Mosaic kernel (``jpaged.pallas_kernels.ragged_attention``)
on the GPU over every configuration in ``variants()`` (GQA groups 1/4/8 x pages 16/64 x
head_dims 64/128, decode and prefill chunks in a checkerboard so every value meets both,
plus a sliding window, a soft cap, a stacked pool and all three at once) and the large
decode / prefill cases of ``large_cases()``. Each variant's bound is ``BOUND_FACTOR`` times
the error the *same inputs* (same shapes and seed) give in Mosaic GPU's interpret mode,
where the kernel's products run as float32 dots of the same bf16 tiles: computed on the CPU
by ``python benchmarks/gpu_mosaic.py --bounds`` and committed in
``gpu_mosaic_bounds.json`` with the digest of the kernel's code (``kernel_digest``). A large case takes the
largest bound of the variants of its phase (decode or prefill). A variant without a
committed bound gets bound 0 (it fails, never passes unchecked); a kernel whose source no
longer matches the digest gets a warning in the report: recompute the bounds (about 4
minutes on 2 CPU cores).

Needs only jax, numpy and this repository's ``pallas_kernels`` (the GPU machine has no
Flax); the timing of the Mosaic kernel lives in ``gpu_check.py`` beside its peers.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import json
import sys
from pathlib import Path

import jax

from jpaged.pallas_kernels import ragged_attention as ra

VARIANT_GROUPS = (1, 4, 8)
VARIANT_PAGES = (16, 64)
VARIANT_HEAD_DIMS = (64, 128)
VARIANT_KV_HEADS = 2  # small enough for interpret mode; the GPU runs the same inputs
PREFILL_CHUNK = 40
BOUND_FACTOR = 3.0
BOUNDS_FILE = Path(__file__).with_name("gpu_mosaic_bounds.json")


def variants() -> list[dict]:
    """gpu_check.Case fields of every Mosaic variant (no bound)."""
    cases = []
    for (gi, group), (pi, page), (di, head_dim) in itertools.product(
            enumerate(VARIANT_GROUPS), enumerate(VARIANT_PAGES),
            enumerate(VARIANT_HEAD_DIMS)):
        chunk = 1 if (gi + pi + di) % 2 == 0 else PREFILL_CHUNK
        cases.append(_variant(f"mosaic-g{group}-p{page}-d{head_dim}", group, page, head_dim,
                              chunk))
    cases += [
        _variant("mosaic-window", 4, 16, 128, 1, sliding_window=100),
        _variant("mosaic-softcap", 8, 64, 64, PREFILL_CHUNK, soft_cap=5.0),
        _variant("mosaic-stacked", 4, 16, 128, 1, num_layers=3),
        _variant("mosaic-window-softcap-stacked", 1, 64, 128, PREFILL_CHUNK,
                 sliding_window=60, soft_cap=5.0, num_layers=2),
    ]
    return cases


def _variant(name, group, page_size, head_dim, chunk, **options) -> dict:
    return dict(name=f"{name}-{'decode' if chunk == 1 else 'prefill'}", batch=3, context=320,
                kernel="mosaic", chunk=chunk, group=group, page_size=page_size,
                head_dim=head_dim, num_kv_heads=VARIANT_KV_HEADS, q_scale=2.0, **options)


def load_bounds() -> dict:
    return json.loads(BOUNDS_FILE.read_text()) if BOUNDS_FILE.exists() else {}


def variant_cases() -> list[dict]:
    """Every variant with its committed bound (0 where none is committed for exactly
    these fields: the check then fails)."""
    committed = load_bounds().get("cases", {})
    cases = []
    for fields in variants():
        entry = committed.get(fields["name"])
        bound = entry["bound"] if entry and entry["fields"] == fields else 0.0
        cases.append(dict(fields, bound=bound))
    return cases


def large_cases() -> list[dict]:
    """Llama-3-8B decode and prefill chunks of 512 and 2048 tokens ending on partial
    pages; each bound the largest variant bound of its phase."""
    bounds = {"decode": 0.0, "prefill": 0.0}
    for case in variant_cases():
        phase = "decode" if case["chunk"] == 1 else "prefill"
        bounds[phase] = max(bounds[phase], case["bound"])
    return [dict(name="mosaic-decode", batch=16, context=8192, kernel="mosaic", q_scale=2.0,
                 bound=bounds["decode"]),
            dict(name="mosaic-prefill-512", batch=2, context=4096, kernel="mosaic",
                 chunk=512, bound=bounds["prefill"]),
            dict(name="mosaic-prefill-2048", batch=1, context=16384, kernel="mosaic",
                 chunk=2048, q_scale=2.0, bound=bounds["prefill"])]


def kernel_digest() -> str:
    """sha256 of the kernel module's code: its syntax tree without imports and
    docstrings, so a moved import or an edited comment keeps the bounds valid."""
    tree = ast.parse(Path(ra.__file__).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom))
                         and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                  and isinstance(n.value.value, str))] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def bound_warnings() -> list[str]:
    """Why the committed bounds may not fit the kernel being checked."""
    committed = load_bounds()
    if not committed:
        return [f"no {BOUNDS_FILE.name}: every Mosaic variant check fails (bound 0); run "
                f"python benchmarks/gpu_mosaic.py --bounds"]
    warnings = []
    if committed.get("kernel_sha256") != kernel_digest():
        warnings.append(f"the Mosaic bounds in {BOUNDS_FILE.name} were computed for another "
                        f"version of ragged_attention.py; recompute them with python "
                        f"benchmarks/gpu_mosaic.py --bounds")
    missing = [c["name"] for c in variant_cases() if not c["bound"]]
    if missing:
        warnings.append(f"no committed bound for {', '.join(missing)} (bound 0: they fail)")
    return warnings


def compute_bounds(log=print) -> dict:
    """Every variant in interpret mode on this machine: its error and bound."""
    import gpu_check  # the suite's inputs and float64 reference; imported here (cycle)
    settings = gpu_check.Settings(interpret=True, tiny=False, deadline=float("inf"))
    cases = {}
    for fields in variants():
        case = gpu_check.Case(**fields)
        result = gpu_check.run_check(case, settings, gpu_check.case_seed(case))
        if result["nan"]:
            raise RuntimeError(f"{case.name}: NaN in interpret mode")
        error = max(result["rel_errors"])
        cases[case.name] = dict(fields=fields, rel_errors=result["rel_errors"],
                                interpret_rel_error=error, bound=BOUND_FACTOR * error)
        log(f"{case.name}: interpret-mode error {error:.2e}, bound {BOUND_FACTOR * error:.2e}")
    return dict(kernel_sha256=kernel_digest(), jax=jax.__version__, factor=BOUND_FACTOR,
                cases=cases)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bounds", action="store_true",
                        help=f"recompute the interpret-mode errors into {BOUNDS_FILE.name}")
    args = parser.parse_args(argv)
    if not args.bounds:
        for case in variant_cases() + large_cases():
            print(f"{case['name']}: bound {case['bound']:.2e}")
        for warning in bound_warnings():
            print(f"warning: {warning}")
        return 0
    BOUNDS_FILE.write_text(json.dumps(compute_bounds(), indent=1) + "\n")
    print(f"wrote {BOUNDS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
