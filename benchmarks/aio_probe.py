"""grpcio's sync server against its asyncio server (grpc.aio) for RecommendProducts (issue #13:
"measure both and keep the better").

Each server is one process with the same bare handler, the server's own answer path
(`product_query`, `ModelHolder.recommend`, the impression writer, `_answer_pb`) and nothing
else: no interceptor (auth, call log, metrics, admission), so what differs is the transport's
threading alone. Three servers:
- `sync`: `grpc.server` with a thread pool of `serve.max_workers` threads, as `nextbest serve`;
- `aio`: `grpc.aio.server`, the answer computed in the event loop (it holds the GIL anyway);
- `aio-pool`: `grpc.aio.server`, the answer computed in a thread pool (`run_in_executor`).
The same grpc.aio client as bench-serve (`load_cell`) drives each at concurrency 1 and 16, the
servers in turn, `--rounds` times. One process each, the GIL switch interval and BLAS threads
as the server sets them.

    python benchmarks/aio_probe.py --events data/complete-journey/events.parquet \\
        --catalog data/complete-journey/catalog.parquet [--seconds 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import (  # noqa: E402
    CONFIG,
    ROOT,
    UNKNOWN_EVERY,
    ServerProcess,
    ensure_model,
    fresh_store,
    load_cell,
    model_arguments,
)

MODES = ("sync", "aio", "aio-pool")


def _answer_path(config: Path, models_dir: Path):
    """The server's answer path on the benchmark model: a function request -> response."""
    from threadpoolctl import threadpool_limits

    from nextbest.config import load_settings
    from nextbest.server import ImpressionRecorder, ModelHolder, _answer_pb, product_query
    from nextbest.service import store_consent
    from nextbest.store.consent_store import open_store

    threadpool_limits(1)
    settings = load_settings(config).with_overrides("serve", models_dir=str(models_dir))
    sys.setswitchinterval(settings.serve.switch_interval_ms / 1000.0)
    store = open_store(f"sqlite:///{(models_dir.parent / 'store.db').resolve()}")
    holder = ModelHolder(settings, store_consent(store, True), store)
    holder.load()
    impressions = ImpressionRecorder(store)

    def answer(request):
        query = product_query(request)
        shown = holder.recommend([query])
        impressions.add(shown, [query.channel])
        return _answer_pb(shown[0], request)

    return answer, settings.serve.max_workers


def run_server(mode: str, config: Path, models_dir: Path) -> int:
    """One probe server on a free port; prints `serving on HOST:PORT` once it answers."""
    import grpc

    from nextbest.v1 import recommender_pb2_grpc

    answer, workers = _answer_path(config, models_dir)
    if mode == "sync":

        class Sync(recommender_pb2_grpc.RecommenderServicer):
            def RecommendProducts(self, request, context):
                return answer(request)

        server = grpc.server(ThreadPoolExecutor(max_workers=workers))
        recommender_pb2_grpc.add_RecommenderServicer_to_server(Sync(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(f"sync serving on 127.0.0.1:{port}", flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        server.stop(1)
        return 0

    pool = ThreadPoolExecutor(max_workers=workers) if mode == "aio-pool" else None

    class Aio(recommender_pb2_grpc.RecommenderServicer):
        async def RecommendProducts(self, request, context):
            if pool is None:
                return answer(request)
            return await asyncio.get_running_loop().run_in_executor(pool, answer, request)

    async def main() -> None:
        server = grpc.aio.server()
        recommender_pb2_grpc.add_RecommenderServicer_to_server(Aio(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"{mode} serving on 127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    model_arguments(parser, required=False)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = (ROOT / args.work_dir).resolve()
    config, models_dir = work / "bench.toml", work / "models"
    if args.serve:
        return run_server(args.serve, config, models_dir)
    if not args.events:
        parser.error("--events is required")
    work.mkdir(parents=True, exist_ok=True)
    config.write_text(CONFIG)
    ensure_model(args, config, models_dir)

    from nextbest.store.artifacts import load_bundle
    from nextbest.v1 import recommender_pb2 as pb

    known = [str(c) for c in load_bundle(models_dir).user_ids]
    order = [known[i] for i in np.random.default_rng(7).permutation(len(known))]
    requests = [
        pb.RecommendProductsRequest(
            customer_id=f"bench-unknown-{k}" if k % UNKNOWN_EVERY == UNKNOWN_EVERY - 1 else c
        )
        for k, c in enumerate(order)
    ]
    results: dict[tuple[str, int], list[dict]] = {}
    for round_ in range(args.rounds):
        for mode in args.modes:
            fresh_store(models_dir)
            cmd = [sys.executable, __file__, "--work-dir", args.work_dir, "--serve", mode]
            server = ServerProcess(mode, cmd, work / f"probe-{mode}.log")
            try:
                address = server.wait_ready()
                for c in args.concurrency:
                    cell = asyncio.run(load_cell(address, requests, c, args.seconds, args.warmup))
                    results.setdefault((mode, c), []).append(cell)
                    print(
                        f"round {round_ + 1} {mode:8s} c={c:<3d} {cell['qps']:7.0f} QPS "
                        f"p50 {cell['p50']:6.2f} ms p99 {cell['p99']:6.2f} ms "
                        f"refused {cell['refused']}",
                        flush=True,
                    )
            finally:
                server.stop()
    print("\n| server | concurrency | QPS per round | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for (mode, c), cells in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        qps = " / ".join(f"{x['qps']:.0f}" for x in cells)
        p50 = " / ".join(f"{x['p50']:.2f}" for x in cells)
        p99 = " / ".join(f"{x['p99']:.2f}" for x in cells)
        print(f"| {mode} | {c} | {qps} | {p50} | {p99} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
