"""`rlipv2 data caption | parse | tag | pseudo-label`: relational pseudo-labelling of detection shards;
`rlipv2 data train-tagger | export-tagger`: the Relation Tagger that `tag` runs.

Model stages run once per rank: under torchrun / SLURM each process takes its share from RANK and
WORLD_SIZE, and a rerun continues where the last one stopped.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rlipv2_scale.data.pseudo.paraphrases import load_table, predicate_synonyms
from rlipv2_scale.errors import UserError


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rlipv2_scale.data.pseudo.caption import BlipCaptioner, Captioner, SamplingConfig
    from rlipv2_scale.data.pseudo.pipeline import caption_shards, require_images

    require_images(args.shards)     # before a captioning model is loaded for nothing
    sampling = SamplingConfig(num_captions=args.num_captions, top_p=args.top_p, min_length=args.min_length,
                              max_length=args.max_length, seed=args.seed)
    captioner: Captioner
    if args.captioner == "blip":
        captioner = BlipCaptioner.from_pretrained(args.model, sampling)
    else:
        from rlipv2_scale.data.pseudo.synthetic_captions import SyntheticCaptioner, TruthCaptioner
        from rlipv2_scale.data.shards import iter_records

        if not args.truth:
            raise UserError("--captioner synthetic needs --truth SHARDS (the scenes with their relations)")
        truth = {str(r.image.id): ([o.name for o in r.objects], [(x.subject, x.object, x.predicate)
                                                                  for x in r.relations])
                 for r in iter_records(args.truth)}
        captioner = TruthCaptioner(truth, SyntheticCaptioner(num_captions=args.num_captions, seed=args.seed))
    rank, world = _rank_world()
    with tqdm(desc=f"captioning (rank {rank}/{world})", unit="img", disable=rank != 0) as bar:
        summary = caption_shards(args.shards, args.out, captioner, rank=rank, world_size=world,
                                 batch_size=args.batch_size, progress=bar.update)
    print(f"captioned {summary.captioned} images ({summary.already_done} already done, "
          f"{len(summary.failed_to_decode)} failed to decode"
          + (f", e.g. {summary.failed_to_decode[:3]}" if summary.failed_to_decode else "") + f") → {args.out}")
    return 0


def _parse(args: argparse.Namespace) -> int:
    from rlipv2_scale.data.pseudo.caption_parsing import make_parser
    from rlipv2_scale.data.pseudo.paraphrases import ParaphraseTable
    from rlipv2_scale.data.pseudo.pipeline import parse_shards

    if args.paraphrases == "synthetic":
        from rlipv2_scale.data.pseudo.synthetic_captions import NAME_PARAPHRASES

        table = ParaphraseTable(NAME_PARAPHRASES)
    else:
        table = load_table(args.paraphrases)
    parse_shards(args.shards, args.captions, make_parser(table, args.parser), args.out, args.chunk_size)
    from rlipv2_scale.data.pseudo.pipeline import PARSE_STATS_FILE

    print((Path(args.out) / PARSE_STATS_FILE).read_text())
    return 0


def _class_names(which: str) -> list[str]:
    if which == "coco80":
        from rlipv2_scale.labels.metadata import hico_objects

        return [o["name"] for o in hico_objects()]
    if which == "o365":
        return list(load_table("o365").classes)
    if which == "synthetic":
        from rlipv2_scale.data.synthetic import CLASS_NAMES

        return list(CLASS_NAMES)
    path = Path(which)
    if not path.is_file():
        raise UserError(f"--classes '{which}': use coco80, o365, synthetic or a text file with one class per line")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _tag(args: argparse.Namespace) -> int:
    import torch

    from rlipv2_scale.data.pseudo.pipeline import tag_shards
    from rlipv2_scale.data.pseudo.tag import TagConfig
    from rlipv2_scale.data.pseudo.tagger_scorer import TaggerScorer
    from rlipv2_scale.models.artifacts import config_of
    from rlipv2_scale.train.export import open_model

    synonyms = predicate_synonyms(args.synonyms)      # a bad file fails before the model loads
    rank, world = _rank_world()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    tagger = open_model(args.checkpoint, device)
    tagger_cfg = config_of(tagger)
    if not tagger_cfg.tagger:
        raise UserError(f"'{args.checkpoint}' holds a {tagger_cfg.name} detector, not a Relation Tagger: pass the "
                        "exported Tagger (`rlipv2 export TAGGER_RUN --out DIR`)")
    scorer = TaggerScorer(tagger, _class_names(args.classes), eval_size=args.eval_size,
                          max_size=args.max_size, device=device)
    cfg = TagConfig(keep_threshold=args.keep_threshold, top_k_per_pair=args.top_k or None, texts=args.texts,
                    synonyms=synonyms, deduplicate=not args.no_dedup, use_captions=args.use_captions)
    summary = tag_shards(args.shards, args.candidates, scorer, args.out, cfg, rank=rank, world_size=world)
    print(f"tagged {summary.tagged} images ({summary.already_done} already done, {summary.without_candidates} "
          f"without candidates, {len(summary.failed_to_decode)} failed to decode"
          + (f", e.g. {summary.failed_to_decode[:3]}" if summary.failed_to_decode else "")
          + f"): {summary.relations} relations ≥ {args.keep_threshold} → {args.out}")
    return 0


def _pseudo_label(args: argparse.Namespace) -> int:
    from rlipv2_scale.data.pseudo.pipeline import export_pseudo_labels

    summary, rep = export_pseudo_labels(args.shards, args.tags, args.out, args.dataset, args.threshold)
    print(summary.format())
    print("relations per threshold: " + ", ".join(f"≥{k}: {v}" for k, v in rep["relations_per_threshold"].items()))
    print("top predicates: " + ", ".join(f"{p} ({n})" for p, n in rep["top_predicates"][:10]))
    if summary.images == 0:
        # Not an error (the threshold is the user's choice), but the folder would only fail in training.
        print(f"rlipv2: warning: no image kept a relation at --threshold {args.threshold}: "
              f"{Path(args.out) / 'shards'} holds no samples and cannot be trained on; lower --threshold "
              f"(see the relations per threshold above) and rerun", file=sys.stderr)
    return 0


def _export_tagger(args: argparse.Namespace) -> int:
    from rlipv2_scale.train.export import export_run

    out = export_run(args.run, args.out)
    print(f"exported the tagger of {args.run} to {out} (use it with `rlipv2 data tag --checkpoint {out}`)")
    return 0


def register(tree) -> None:
    p = tree.group_command("data", "caption", "caption the images of detection shards (BLIP or synthetic)", _caption)
    p.add_argument("--shards", required=True, help="MDS shards of a detection dataset")
    p.add_argument("--out", required=True, help="folder for captions.rank*.jsonl")
    p.add_argument("--captioner", choices=["blip", "synthetic"], default="blip")
    p.add_argument("--model", default="Salesforce/blip-image-captioning-large", help="BLIP hub id or local folder")
    p.add_argument("--truth", help="synthetic captioner: shards holding the true scene graphs")
    p.add_argument("--num-captions", type=int, default=10)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--min-length", type=int, default=5)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)

    p = tree.group_command("data", "parse", "parse captions into triplets and relation candidates", _parse)
    p.add_argument("--shards", required=True)
    p.add_argument("--captions", required=True, help="output folder of `rlipv2 data caption`")
    p.add_argument("--out", required=True)
    p.add_argument("--paraphrases", default="coco80", help="coco80 | o365 | synthetic | a JSON file")
    p.add_argument("--parser", choices=["auto", "rules", "spacy"], default="auto")
    p.add_argument("--chunk-size", type=int, default=100, help="candidate pairs per Tagger forward")

    p = tree.group_command("data", "tag", "score relation candidates with the Relation Tagger", _tag)
    p.add_argument("--shards", required=True)
    p.add_argument("--candidates", required=True, help="output folder of `rlipv2 data parse`")
    p.add_argument("--checkpoint", required=True, help="the Relation Tagger: a model directory, or its training run")
    p.add_argument("--classes", default="coco80", help="object class list: coco80 | o365 | synthetic | a file")
    p.add_argument("--out", required=True)
    p.add_argument("--keep-threshold", type=float, default=0.05, help="confidences kept in the output")
    p.add_argument("--texts", choices=["candidates", "all"], default="candidates",
                   help="texts a pair may take: its own candidate texts, or every text of the forward (the "
                        "original; far less precise)")
    p.add_argument("--synonyms", default="none", metavar="none|synthetic|FILE",
                   help="merge synonymous wordings of one predicate per pair (a JSON file: predicate → wordings)")
    p.add_argument("--use-captions", action=argparse.BooleanOptionalAction, default=True,
                   help="weigh the Tagger with the captions: per pair the predicate of highest Tagger × caption "
                        "share, per class pair as many pairs as one caption relates, confidence √(Tagger × share of "
                        "captions relating the two classes)")
    p.add_argument("--top-k", type=int, default=None,
                   help="with --no-use-captions: keep at most K texts per pair (0: no limit)")
    p.add_argument("--no-dedup", action="store_true", help="keep repeated (pair, text) entries")
    p.add_argument("--eval-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)

    p = tree.group_command("data", "pseudo-label", "tagged candidates → scene-graph JSON, shards and a report",
                           _pseudo_label)
    p.add_argument("--shards", required=True, help="the detection shards that were tagged")
    p.add_argument("--tags", required=True, help="output folder of `rlipv2 data tag`")
    p.add_argument("--out", required=True)
    p.add_argument("--dataset", default="coco2017", help="the `dataset` field of the JSON (coco2017, o365, ...)")
    p.add_argument("--threshold", type=float, default=0.2, help="confidence kept in the shards (training)")

    from rlipv2_scale.cli.train import add_train_arguments, run_train

    add_train_arguments(tree.group_command("data", "train-tagger", "train the Relation Tagger: the same as "
                                           "`rlipv2 train` with a tagger recipe (recipes/tagger/)", run_train))

    p = tree.group_command("data", "export-tagger", "the same as `rlipv2 export RUN --out DIR` for a Tagger run",
                           _export_tagger)
    p.add_argument("run", type=Path, help="the run directory (or a checkpoints/step_* directory)")
    p.add_argument("out", type=Path, help="model directory to write")
