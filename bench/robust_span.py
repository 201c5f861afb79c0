"""How much of each shapes concept lies outside the span its preserved texts use: the most an edit that keeps every
preserved text's keys and values exactly (a null-space-constrained edit) could remove (docs/robust.md).

    python bench/robust_span.py [--models shapes shapes-mmdit] [--supports 0.9999 0.999999 1]

For each concept, with the robust recipe's texts: the best embedding's residual (`rece.projections.best_residuals`,
of what tells the concept's prompts from " ") against the projection onto the K/V directions holding `support` of
the preserved texts' energy (the first space an MMDiT reads: its token rows).
"""

from __future__ import annotations

import argparse

from machine import describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shapes", "shapes-mmdit"])
    parser.add_argument("--supports", nargs="+", type=float, default=[0.9999, 0.999999, 1.0 - 1e-9])
    args = parser.parse_args()
    print(describe(), flush=True)
    import torch

    from rece import projections as pj
    from rece.erase import _Texts
    from rece.models import load_model
    from rece.toy import door

    print("| model | concept | " + " | ".join(f"outside support {s:g}" for s in args.supports) + " |")
    print("|---|---|" + "---|" * len(args.supports))
    for model in args.models:
        view = load_model(model).views[0]
        gram = view.original_gram().to(torch.float64)
        for concept in door.world_concepts():
            recipe = door.erasure_arguments(concept, model, "robust")
            texts = _Texts.encode(view, recipe["concepts"] + recipe["preserve"] + ["", " "])
            preserve = texts.rows(recipe["preserve"] + [""])
            cells = []
            for support in args.supports:
                keep = pj.key_value_projection(pj.unused_directions(preserve, gram, support), gram)
                rows = [texts.attended(c) for c in recipe["concepts"]]
                res = pj.best_residuals(keep, gram, rows, texts.embeddings[" "])
                cells.append(f"{sum(res) / len(res):.3f}")
            print(f"| {model} | {concept} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
