"""Engine snapshots: size on disk against the pool's, and save / restore times.

The tiny model on this machine's device: an ``LLM`` with a pool of ``num_pages`` pages of
16 tokens is filled to about a fraction of its pages by prompts in flight (prefilled, a
few tokens decoded), then saved with ``LLM.save_snapshot`` and restored in-process with
``LLM.from_snapshot``. Only pages in use are written, so a snapshot's size follows the
load, not the pool. "build" is the time of ``LLM(...)`` with the same options alone (model
and empty pool, no state): restore time less build is what restoring the state costs.

    PYTHONPATH=$PWD python benchmarks/snapshot.py   # ~1-2 min on 2 busy CPU cores
"""

import argparse
import json
import pathlib
import shutil
import tempfile
import time

import numpy as np

from jpaged.engine import snapshot_files
from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams

PAGE_SIZE = 16
PROMPT = 240   # tokens: 15 full pages and 1 partial page once a token is decoded
CASES = [   # (num_pages, target fraction of pages held, kv_cache_dtype)
    (1024, 0.1, "auto"), (1024, 0.5, "auto"), (4096, 0.1, "auto"), (4096, 0.5, "auto"),
    (4096, 0.5, "int8"),
]


def directory_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(num_pages: int, fill: float, kv_cache_dtype: str, work: pathlib.Path) -> dict:
    options = dict(page_size=PAGE_SIZE, num_pages=num_pages, max_num_seqs=256,
                   max_num_batched_tokens=4096, max_model_len=1024, watermark=0.0,
                   kv_cache_dtype=kv_cache_dtype)
    llm = LLM("tiny", **options)
    rng = np.random.default_rng(0)
    requests = max(1, int(fill * (num_pages - 1)) // (PROMPT // PAGE_SIZE + 1))
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for _ in range(requests):
        llm.engine.add_request(rng.integers(0, 512, PROMPT).tolist(), params)
    while llm.engine.scheduler.waiting or any(
            s.num_output_tokens < 2 for s in llm.engine.scheduler.running):
        llm.engine.step()
    metrics = llm.engine.metrics()
    path = work / f"snap-{num_pages}-{fill}-{kv_cache_dtype}"
    t0 = time.perf_counter()
    llm.save_snapshot(path)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored = LLM.from_snapshot(path)
    restore_s = time.perf_counter() - t0
    assert restored.engine.metrics()["used_pages"] == metrics["used_pages"]
    t0 = time.perf_counter()
    LLM("tiny", **options)
    build_s = time.perf_counter() - t0
    pool_bytes = num_pages * llm.kv_cache_info()["bytes_per_page"]
    size = directory_bytes(path)
    host_bytes = (snapshot_files.data_dir(path) / snapshot_files.HOST_FILE).stat().st_size
    shutil.rmtree(path)
    return dict(num_pages=num_pages, kv_cache_dtype=kv_cache_dtype, requests=requests,
                used_pages=metrics["used_pages"], cached_pages=metrics["cached_pages"],
                pool_bytes=pool_bytes, snapshot_bytes=size,
                host_json_bytes=host_bytes, size_vs_pool=size / pool_bytes, save_s=save_s,
                restore_s=restore_s, build_s=build_s)


def markdown(rows: list[dict]) -> str:
    lines = ["# Engine snapshots: size and times", "",
             "Tiny model (4 layers, 2 kv heads, head_dim 32), pages of 16 tokens, CPU "
             "(2 shared cores). Restore is in-process and includes building the LLM "
             "(`build`: the same `LLM(...)` alone).", "",
             "| pool pages | kv dtype | requests | pages used | pool MiB | snapshot MiB | "
             "of which JSON KiB | snapshot / pool | save s | restore s | build s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['num_pages']} | {r['kv_cache_dtype']} | {r['requests']} | "
              f"{r['used_pages']} | {r['pool_bytes'] / 2**20:.1f} | "
              f"{r['snapshot_bytes'] / 2**20:.2f} | {r['host_json_bytes'] / 2**10:.0f} | "
              f"{r['size_vs_pool']:.1%} | "
              f"{r['save_s']:.2f} | {r['restore_s']:.2f} | {r['build_s']:.2f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(*case, pathlib.Path(work)) for case in CASES]
    text = markdown(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "snapshot.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "snapshot.md").write_text(text)
    print(f"wrote {args.out}/snapshot.{{json,md}}")


if __name__ == "__main__":
    main()
