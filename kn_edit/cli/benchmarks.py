"""`kn-edit make-counterfact` and `kn-edit make-multihop`: benchmark files built offline from ParaRel, in CounterFact's
and MQuAKE's layouts (read back with data.source counterfact / mquake)."""

from __future__ import annotations

import argparse

from .ui import console


def _common(parser: argparse.ArgumentParser, default_n: int) -> None:
    parser.add_argument("--pararel", metavar="PATH",
                        help="ParaRel folder (patterns/ and facts/; default: the download cache)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="file to write (.json: a list; .jsonl: one record a line); must not exist")
    parser.add_argument("--facts", type=int, default=default_n, metavar="N",
                        help=f"records to draw (default {default_n})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    parser.add_argument("--relations", help="comma-separated ParaRel relation ids to build from (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def register(sub: argparse._SubParsersAction) -> None:
    cf = sub.add_parser("make-counterfact",
                        help="write a CounterFact-style benchmark built from ParaRel (no model needed)")
    _common(cf, 1000)
    cf.add_argument("--paraphrases", type=int, default=2, help="paraphrase prompts per fact (default 2)")
    cf.add_argument("--neighbours", type=int, default=10, help="neighbourhood prompts per fact (default 10)")
    cf.add_argument("--attributes", type=int, default=10, help="attribute prompts per fact (default 10)")
    cf.add_argument("--generation", type=int, default=5, help="generation prompts per fact (default 5)")
    cf.set_defaults(func=run_make_counterfact)

    mh = sub.add_parser("make-multihop", help="write two-hop edit chains built from ParaRel in MQuAKE's layout")
    _common(mh, 1000)
    mh.add_argument("--questions", type=int, default=3, help="cloze questions per chain (default 3)")
    mh.set_defaults(func=run_make_multihop)


def _facts(args: argparse.Namespace):
    from ..data import load_pararel
    from ..storage.atomic import check_new_file

    check_new_file(args.out, overwrite=args.overwrite, flag="--overwrite")  # before reading anything
    relations = [r.strip() for r in args.relations.split(",") if r.strip()] if args.relations else None
    return load_pararel(args.pararel, relations=relations, seed=args.seed)


def _written(records: list, args: argparse.Namespace, what: str) -> int:
    from ..data import write_benchmark

    path = write_benchmark(records, args.out, overwrite=args.overwrite)
    fewer = f" (only {len(records)} of the {args.facts} asked for exist)" if len(records) < args.facts else ""
    console().print(f"wrote {len(records)} {what} to {path}{fewer}", highlight=False, soft_wrap=True)
    return 0


def run_make_counterfact(args: argparse.Namespace) -> int:
    from ..data import build_counterfact

    records = build_counterfact(_facts(args), n=args.facts, seed=args.seed, paraphrases=args.paraphrases,
                                neighbours=args.neighbours, attributes=args.attributes, generation=args.generation)
    return _written(records, args, "CounterFact records")


def run_make_multihop(args: argparse.Namespace) -> int:
    from ..data import build_two_hop

    records = build_two_hop(_facts(args), n=args.facts, seed=args.seed, questions=args.questions)
    return _written(records, args, "two-hop MQuAKE records")
