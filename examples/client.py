"""An example client of the nextbest gRPC server, used by `make demo`.

    python examples/client.py --address 127.0.0.1:50051 --customers 12347 14911 \\
        --product 85123A --content guide-holder guide-mug

It waits until the server reports SERVING, then prints next best products with their reasons
for each customer, products similar to one product, and the relevance of some content for the
first customer, through `nextbest.client.Client` (TLS with `--ca`, a token from $NEXTBEST_TOKEN).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from nextbest.client import Client
from nextbest.v1 import recommender_pb2 as pb


def line(rank: int, item) -> str:
    price = f"{item.price:8.2f}" if item.HasField("price") else " " * 8
    return f"  {rank}. {item.product_id:<8} {item.score:.3f} {price}  {item.title}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--ca", help="PEM file of the server's CA (turns TLS on)")
    p.add_argument("--token-env", default="NEXTBEST_TOKEN", help="env variable with the token")
    p.add_argument("--customers", nargs="+", required=True)
    p.add_argument("--product", required=True, help="product for SimilarProducts")
    p.add_argument("--content", nargs="*", default=[], help="content ids to score")
    p.add_argument("--limit", type=int, default=5)
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for SERVING")
    args = p.parse_args()

    with Client(args.address, ca=args.ca, token=os.environ.get(args.token_env)) as nb:
        try:
            nb.wait_until_serving(args.wait)
        except TimeoutError as exc:
            sys.exit(f"error: {exc}")
        info = nb.model_info()
        print(
            f"model {info.version} ({info.cf_model}, {info.customers:,} customers, "
            f"{info.products:,} products, {info.content_items:,} content items)"
        )
        for customer in args.customers:
            resp = nb.recommend(customer, limit=args.limit)
            why = ""
            if not resp.personalized:
                reason = pb.NotPersonalizedReason.Name(resp.not_personalized_reason)
                why = f" (not personalized: {reason})"
            print(f"\nnext best products for customer {customer}{why}")
            for rank, item in enumerate(resp.items, 1):
                print(line(rank, item))
                for reason in item.reasons:
                    print(f"       {reason.text}")

        similar = nb.similar([args.product], limit=args.limit)
        print(f"\nsimilar to product {args.product}")
        for rank, item in enumerate(similar.items, 1):
            print(line(rank, item))

        if args.content:
            scored = nb.score_content(args.customers[0], args.content)
            print(f"\ncontent for customer {args.customers[0]}")
            for item in scored.items:
                reason = item.reasons[0].text if item.reasons else ""
                print(f"  {item.relevance:.3f}  {item.title}  ({reason})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as exc:
        sys.exit(f"error: {exc.code().name}: {exc.details()}")
