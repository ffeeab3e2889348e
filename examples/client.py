"""An example client of the nextbest gRPC server, used by `make demo`.

    python examples/client.py --address 127.0.0.1:50051 --customers 12347 14911 \\
        --product 85123A --content guide-holder guide-mug

It waits until the server reports SERVING, then prints next best products with their reasons
for each customer, products similar to one product, and the relevance of some content for the
first customer. It uses only the stubs generated from protos/ (package `nextbest.v1`).
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextbest.v1 import admin_pb2, admin_pb2_grpc
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb


def wait_serving(channel: grpc.Channel, timeout_s: float) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            sys.exit(f"error: server not SERVING after {timeout_s:.0f} s")
        time.sleep(0.2)


def line(rank: int, item) -> str:
    price = f"{item.price:8.2f}" if item.HasField("price") else " " * 8
    return f"  {rank}. {item.product_id:<8} {item.score:.3f} {price}  {item.title}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--customers", nargs="+", required=True)
    p.add_argument("--product", required=True, help="product for SimilarProducts")
    p.add_argument("--content", nargs="*", default=[], help="content ids to score")
    p.add_argument("--limit", type=int, default=5)
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for SERVING")
    args = p.parse_args()

    with grpc.insecure_channel(args.address) as channel:
        wait_serving(channel, args.wait)
        stub = rpb.RecommenderStub(channel)
        info = admin_pb2_grpc.AdminStub(channel).GetModelInfo(admin_pb2.GetModelInfoRequest())
        print(
            f"model {info.version} ({info.cf_model}, {info.customers:,} customers, "
            f"{info.products:,} products, {info.content_items:,} content items)"
        )
        for customer in args.customers:
            resp = stub.RecommendProducts(
                pb.RecommendProductsRequest(customer_id=customer, limit=args.limit), timeout=5
            )
            why = ""
            if not resp.personalized:
                reason = pb.NotPersonalizedReason.Name(resp.not_personalized_reason)
                why = f" (not personalized: {reason})"
            print(f"\nnext best products for customer {customer}{why}")
            for rank, item in enumerate(resp.items, 1):
                print(line(rank, item))
                for reason in item.reasons:
                    print(f"       {reason.text}")

        similar = stub.SimilarProducts(
            pb.SimilarProductsRequest(product_ids=[args.product], limit=args.limit), timeout=5
        )
        print(f"\nsimilar to product {args.product}")
        for rank, item in enumerate(similar.items, 1):
            print(line(rank, item))

        if args.content:
            scored = stub.ScoreContent(
                pb.ScoreContentRequest(
                    customer_id=args.customers[0],
                    candidates=[pb.ContentCandidate(content_id=c) for c in args.content],
                ),
                timeout=5,
            )
            print(f"\ncontent for customer {args.customers[0]}")
            for item in scored.items:
                reason = item.reasons[0].text if item.reasons else ""
                print(f"  {item.relevance:.3f}  {item.title}  ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
