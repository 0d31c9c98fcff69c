"""The Mosaic GPU kernels' hardware checks: which configurations, and how tight.

``benchmarks/gpu_check.py`` checks both Mosaic kernels on the GPU over ``variants()``:
the ragged kernel (``jpaged.pallas_kernels.ragged_attention``) over GQA groups 1/4/8 x
pages 16/64 x head_dims 64/128, decode and prefill chunks in a checkerboard so every value
meets both, plus a sliding window, a soft cap, a stacked pool, all three at once, a forced
split-K decode and 8-bit pages (int8 decode, fp8 prefill with bfloat16 queries); the
decode tile (``jpaged.pallas_kernels.mosaic_decode``, what ``impl="mosaic"`` runs for
decode) over the same grid, decode only, plus window with soft cap, a stacked pool with
split-K, int8, fp8 and the warp-specialized pipeline. Then the Llama-3-8B cases of ``large_cases()``. Each variant's
bound is ``BOUND_FACTOR`` times the error the *same inputs* (same shapes and seed) give in
Mosaic GPU's interpret mode, where the kernels' products run as float32 dots of the same
16-bit tiles: computed on the CPU by ``python benchmarks/gpu_mosaic.py --bounds`` and
committed in ``gpu_mosaic_bounds.json`` with the digest of the kernels' code
(``kernel_digest``). A large case takes the largest bound of its kernel's variants of the
same phase and dtype. A variant without a committed bound gets bound 0 (it fails, never
passes unchecked); kernels whose code no longer matches the digest get a warning in the
report and fail tests/test_gpu_check.py: recompute the bounds (about 10 minutes on 2 CPU
cores).

Needs only jax, numpy and this repository's kernels (the GPU machine has no Flax); the
timing of the Mosaic kernels lives in ``gpu_check.py`` beside their peers.
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

from jpaged.pallas_kernels import mosaic_decode as md
from jpaged.pallas_kernels import online_softmax, page_ring
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
        _variant("mosaic-splits-3", 4, 16, 128, 1, num_splits=3),
        _variant("mosaic-int8", 4, 16, 128, 1, dtype="int8"),
        _variant("mosaic-fp8", 8, 64, 64, PREFILL_CHUNK, dtype="fp8"),
    ]
    # The decode tile (impl="mosaic" decode): head_dims 64+, decode only.
    for group, page, head_dim in itertools.product(VARIANT_GROUPS, VARIANT_PAGES,
                                                   VARIANT_HEAD_DIMS):
        cases.append(_variant(f"mosaic-decode-tile-g{group}-p{page}-d{head_dim}", group, page,
                              head_dim, 1, kernel="mosaic_decode"))
    cases += [
        _variant("mosaic-decode-tile-window-softcap", 4, 16, 128, 1, kernel="mosaic_decode",
                 sliding_window=100, soft_cap=5.0),
        _variant("mosaic-decode-tile-stacked-splits-3", 8, 64, 64, 1, kernel="mosaic_decode",
                 num_layers=3, num_splits=3),
        _variant("mosaic-decode-tile-int8", 4, 16, 128, 1, kernel="mosaic_decode",
                 dtype="int8"),
        _variant("mosaic-decode-tile-fp8", 1, 64, 128, 1, kernel="mosaic_decode",
                 dtype="fp8"),
        _variant("mosaic-decode-tile-warp-specialized", 4, 16, 128, 1,
                 kernel="mosaic_decode", warp_specialized=True),
    ]
    return cases


def _variant(name, group, page_size, head_dim, chunk, kernel="mosaic", **options) -> dict:
    if kernel == "mosaic":
        name = f"{name}-{'decode' if chunk == 1 else 'prefill'}"
    return dict(name=name, batch=3, context=320, kernel=kernel, chunk=chunk, group=group,
                page_size=page_size, head_dim=head_dim, num_kv_heads=VARIANT_KV_HEADS,
                q_scale=2.0, **options)


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
    """Llama-3-8B bf16 decode (both Mosaic kernels) and prefill chunks of 512 and 2048
    tokens (the ragged kernel) ending on partial pages, each bound the largest bound of
    that kernel's bf16 variants of its phase; and an int8 pool of 3 GiB (3.2e9 code
    elements, past 2**31) for each kernel under its int8 variant's bound."""
    bounds = {}
    for case in variant_cases():
        key = (case["kernel"], case["chunk"] > 1, case.get("dtype", "bfloat16"))
        bounds[key] = max(bounds.get(key, 0.0), case["bound"])
    llama = dict(q_scale=2.0)
    return [
        dict(name="mosaic-decode-tile-int8-pool-3GiB", batch=96, context=32768,
             kernel="mosaic_decode", dtype="int8", bound=bounds["mosaic_decode", False, "int8"],
             **llama),
        dict(name="mosaic-int8-pool-3GiB", batch=96, context=32768, kernel="mosaic",
             dtype="int8", bound=bounds["mosaic", False, "int8"], **llama),
        dict(name="mosaic-decode-tile-16x8192", batch=16, context=8192, kernel="mosaic_decode",
             bound=bounds["mosaic_decode", False, "bfloat16"], **llama),
        dict(name="mosaic-decode", batch=16, context=8192, kernel="mosaic",
             bound=bounds["mosaic", False, "bfloat16"], **llama),
        dict(name="mosaic-prefill-512", batch=2, context=4096, kernel="mosaic", chunk=512,
             bound=bounds["mosaic", True, "bfloat16"]),
        dict(name="mosaic-prefill-2048", batch=1, context=16384, kernel="mosaic", chunk=2048,
             bound=bounds["mosaic", True, "bfloat16"], **llama)]


def kernel_digest() -> str:
    """sha256 of the Mosaic kernels' code (both kernels, and the online softmax and page
    ring they share): their syntax trees without imports and docstrings, so a moved import or an
    edited comment keeps the bounds valid."""
    modules = (ra, md, online_softmax, page_ring)
    return hashlib.sha256("".join(_code_digest(m) for m in modules).encode()).hexdigest()


def _code_digest(module) -> str:
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom))
                         and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                  and isinstance(n.value.value, str))] or [ast.Pass()]
    return hashlib.sha256(_dump(tree).encode()).hexdigest()


def _dump(node) -> str:
    """The tree as text, the same on every Python: ``ast.dump`` is not (3.12 added empty
    ``type_params`` fields, 3.13 stopped printing empty ones), so fields that are None or
    empty are left out and only the node types, fields and constants remain."""
    if isinstance(node, ast.AST):
        fields = [f"{name}={_dump(value)}" for name, value in ast.iter_fields(node)
                  if value is not None and value != []]
        return f"{type(node).__name__}({', '.join(fields)})"
    if isinstance(node, list):
        return f"[{', '.join(_dump(item) for item in node)}]"
    return repr(node)


def bound_warnings() -> list[str]:
    """Why the committed bounds may not fit the kernel being checked."""
    committed = load_bounds()
    if not committed:
        return [f"no {BOUNDS_FILE.name}: every Mosaic variant check fails (bound 0); run "
                f"python benchmarks/gpu_mosaic.py --bounds"]
    warnings = []
    if committed.get("kernel_sha256") != kernel_digest():
        warnings.append(f"the Mosaic bounds in {BOUNDS_FILE.name} were computed for another "
                        f"version of ragged_attention.py / mosaic_decode.py / "
                        f"online_softmax.py / page_ring.py; recompute them with python "
                        f"benchmarks/gpu_mosaic.py --bounds")
    missing = [c["name"] for c in variant_cases() if not c["bound"]]
    if missing:
        warnings.append(f"no committed bound for {', '.join(missing)} (bound 0: they fail)")
    return warnings


def compute_bounds(log=print, keep=None) -> dict:
    """Every variant in interpret mode on this machine: its error and bound. ``keep``:
    committed entries to reuse where their fields still match (``--missing``)."""
    import gpu_check  # the suite's inputs and float64 reference; imported here (cycle)
    settings = gpu_check.Settings(interpret=True, tiny=False, deadline=float("inf"))
    cases = {}
    for fields in variants():
        kept = (keep or {}).get(fields["name"])
        if kept and kept["fields"] == fields:
            cases[fields["name"]] = kept
            continue
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
    parser.add_argument("--missing", action="store_true",
                        help="with --bounds: only variants without a committed entry")
    args = parser.parse_args(argv)
    if not args.bounds:
        for case in variant_cases() + large_cases():
            print(f"{case['name']}: bound {case['bound']:.2e}")
        for warning in bound_warnings():
            print(f"warning: {warning}")
        return 0
    keep = load_bounds().get("cases") if args.missing else None
    BOUNDS_FILE.write_text(json.dumps(compute_bounds(keep=keep), indent=1) + "\n")
    print(f"wrote {BOUNDS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
