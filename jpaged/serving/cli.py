"""The ``jpaged`` command: ``jpaged generate``, ``bench``, ``serve`` and ``distributed`` (also
``python -m jpaged.parallel.distributed``)."""

from __future__ import annotations

import argparse
import json
import sys

from jpaged.engine.config import add_arguments as add_engine_arguments
from jpaged.serving.limits import add_arguments as add_limit_arguments


def _generate(args) -> None:
    from jpaged.engine.config import options_from_args
    from jpaged.engine.engine import LLM
    from jpaged.host.sampling_params import SamplingParams

    llm = LLM(args.model, **options_from_args(args))
    prompt = args.prompt
    if args.token_ids:
        prompt = [int(t) for t in args.prompt.split(",")]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, n=args.n)
    for output in llm.generate([prompt], params):
        for completion in output.outputs:
            shown = completion.text if completion.text is not None else completion.token_ids
            print(f"[{completion.index}] ({completion.finish_reason}) {shown}")


def _bench(args) -> None:
    from jpaged.tools.bench import Trace, compare, table

    trace = Trace(num_requests=args.num_requests, rate=args.rate, max_len=args.max_model_len)
    print(f"paged vs dense engine on {args.model!r}: {args.num_requests} requests, KV memory "
          f"of {args.kv_tokens} tokens, max_model_len {args.max_model_len}", file=sys.stderr)
    results = compare(args.model, trace, kv_tokens=args.kv_tokens,
                      max_model_len=args.max_model_len, page_size=args.page_size)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _serve(args) -> None:
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two models: {args.model_tag!r} and --model {args.model!r}")
    args.model = args.model_tag or args.model or "tiny"
    try:
        import jinja2, prometheus_client, starlette, uvicorn  # noqa: F401, E401
    except ImportError as error:
        raise ValueError(f"jpaged serve needs the server extra: pip install 'jpaged[serve]' "
                         f"({error})") from None
    from jpaged.serving.server import main

    main(args)


def _distributed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", help="host:port of process 0 (default: detected "
                        "by jax.distributed, e.g. under SLURM)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--cpu-collectives", choices=["gloo", "mpi"],
                        help="collectives between CPU processes (CPU-only runs)")
    parser.add_argument("--model", default="tiny", help='"tiny" or a checkpoint directory')
    parser.add_argument("--prompt", action="append", required=True,
                        help="text, or comma-separated token ids; repeat for several")
    parser.add_argument("--max-tokens", type=int, default=16)


DISTRIBUTED_HELP = ("Greedy generation with one tensor-parallel engine over every process's "
                    "devices; run the same command on each process (only --process-id "
                    "differs). Process 0 prints one JSON line per prompt.")


def distributed_main(argv=None) -> None:
    """``python -m jpaged.parallel.distributed``: the same as ``jpaged distributed``."""
    parser = argparse.ArgumentParser(prog="python -m jpaged.parallel.distributed",
                                     description=DISTRIBUTED_HELP)
    _distributed_arguments(parser)
    _distributed(parser.parse_args(argv))


def _distributed(args) -> None:
    import jax

    from jpaged.parallel import distributed
    from jpaged.engine.engine import LLM
    from jpaged.host.sampling_params import SamplingParams

    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    llm = LLM(args.model, tensor_parallel=jax.device_count())
    if jax.process_index():
        distributed.serve(llm)
        return
    prompts = [[int(t) for t in p.split(",")] if p.replace(",", "").isdigit() else p
               for p in args.prompt]
    try:
        outputs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens,
                                                       temperature=0.0))
    finally:
        distributed.stop()
    for prompt, output in zip(args.prompt, outputs):
        print(json.dumps(dict(prompt=prompt, token_ids=output.token_ids, text=output.text)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="jpaged", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text or token ids")
    gen.add_argument("--model", default="tiny",
                     help="checkpoint directory, or 'tiny' for the embedded random model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--token-ids", action="store_true",
                     help="--prompt is comma-separated token ids (models without tokenizer)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("-n", type=int, default=1)
    add_engine_arguments(gen)
    gen.set_defaults(run=_generate)

    bench = commands.add_parser("bench", help="paged vs dense engine throughput")
    bench.add_argument("--model", default="tiny")
    bench.add_argument("--num-requests", type=int, default=200)
    bench.add_argument("--rate", type=float, default=None,
                       help="Poisson arrival rate (requests/s); default: all at once")
    bench.add_argument("--kv-tokens", type=int, default=8192)
    bench.add_argument("--max-model-len", type=int, default=512)
    bench.add_argument("--page-size", type=int, default=16)
    bench.add_argument("--json", default=None, help="also write the figures here")
    bench.set_defaults(run=_bench)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server",
                                description="Serve a model over OpenAI's HTTP API: "
                                "/v1/completions, /v1/chat/completions, /v1/models, /health, "
                                "/metrics. Needs the [serve] extra (starlette, uvicorn, "
                                "prometheus-client, jinja2).")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="checkpoint directory, or 'tiny' (as vLLM: jpaged serve MODEL)")
    serve.add_argument("--model", default=None,
                       help="the same as MODEL (default: 'tiny', the embedded random model)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: --model)")
    serve.add_argument("--chat-template", default=None,
                       help="a Jinja chat template file (default: the checkpoint's)")
    serve.add_argument("--api-key", default=None,
                       help="clients must send 'Authorization: Bearer KEY' to every /v1 "
                       "route (default: $JPAGED_API_KEY, else $VLLM_API_KEY; none: open)")
    serve.add_argument("--disable-log-requests", action="store_true",
                       help="do not log each request's prompt length and sampling params")
    serve.add_argument("--max-log-len", type=int, default=None,
                       help="log at most this many prompt characters / token ids")
    serve.add_argument("--log-level", "--uvicorn-log-level", dest="log_level",
                       default="info", choices=LOG_LEVELS,
                       help="the server's log level (vLLM: --uvicorn-log-level)")
    serve.add_argument("--disable-uvicorn-access-log", action="store_true",
                       help="no access log line per HTTP request")
    add_engine_arguments(serve)
    add_limit_arguments(serve)
    serve.set_defaults(run=_serve)

    dist = commands.add_parser("distributed", help="one engine over several processes",
                               description=DISTRIBUTED_HELP)
    _distributed_arguments(dist)
    dist.set_defaults(run=_distributed)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"jpaged: error: {error}\n")


if __name__ == "__main__":
    main()
