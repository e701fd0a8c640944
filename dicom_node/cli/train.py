"""``spinenode train ...``: training lives in its own package; only this command imports it.
Training reads its own YAML config and flags, never the node's SPINENODE_* settings."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.cli.common import Fatal


def cmd_train(args: argparse.Namespace) -> int:
    """Training lives in its own package; the node never imports it except for this command."""
    from training.config import ConfigError, load_config, torch_device
    from training.dataset_index import DatasetIndex
    from training.init_weights import InitWeightsError
    from training.vindr import DatasetError

    try:
        if args.train_command == "weights":
            return _check_weights(args.file, args.arch)
        config = _with_init_weights(load_config(args.train_config), args)
        if args.train_command == "prepare":
            from training.prepare import prepare

            dataset = prepare(args.data, args.out, config)
            images = dataset.images
            abnormal = sum(image.abnormal for image in images)
            print(f"prepared {len(images)} images ({abnormal} abnormal) in {args.out}; "
                  f"data fingerprint {dataset.fingerprint[:16]}")
            return 0
        if not DatasetIndex.exists(args.out):
            raise Fatal(f"{args.out} is not a prepared run: run 'spinenode train prepare' first")
        from training.classify import cross_validate, fit_ensemble

        if args.train_command == "evaluate":
            from training.evaluate import evaluate

            result = evaluate(args.out, args.data, args.bundle or args.out / "bundle")
            c, d = result["classification"], result["detection"]
            print(f"test: AUROC {c['auroc']:.4f} (95% CI {c['auroc_ci'][0]:.4f}-"
                  f"{c['auroc_ci'][1]:.4f}), sensitivity {c['sensitivity']:.4f}, specificity "
                  f"{c['specificity']:.4f}, F1 {c['f1']:.4f}; mAP@0.5 {d['map50']:.4f}, "
                  f"mAP@0.5:0.95 {d['map50_95']:.4f}; report in {args.out / 'report'}")
        elif args.train_command == "ablate":
            from training.ablation import TABLES, ablate

            result = ablate(args.out, config.detect, args.bundle or args.out / "bundle",
                            args.device, tuple(args.table or TABLES))
            for table, rows in result["tables"].items():
                for row in rows:
                    print(f"{table}: {row['row']}: mAP@0.5 {row['map50']:.4f}, "
                          f"mAP@0.5:0.95 {row['map50_95']:.4f}")
            print(f"report in {args.out / 'report' / 'ablation.md'}")
        elif args.train_command == "export":
            from training.export import export_bundle

            target = export_bundle(args.out, config, args.bundle or args.out / "bundle",
                                   args.name, args.version)
            print(f"bundle written to {target}")
        elif args.train_command == "detect":
            from training.detect import train_detector

            torch_device(args.device)  # a clear error where the GPU is missing
            best = train_detector(args.out, config.detect, device=args.device)
            print(f"detector trained: {best}")
        elif args.train_command == "final":
            from training.classify import train_final_members

            for name, final in train_final_members(args.out, config,
                                                   torch_device(args.device)).items():
                print(f"{name}: trained on all {final['images']} training images for "
                      f"{final['epochs']} epochs (folds' best: {final['fold_best_epochs']})")
        elif args.train_command == "classify":
            for name, result in cross_validate(args.out, config,
                                               torch_device(args.device)).items():
                aurocs = ", ".join(f"{f['val_auroc']:.3f}" for f in result["folds"])
                print(f"{name}: validation AUROC per fold {aurocs}; best fold "
                      f"{result['best_fold']}")
        else:
            summary = fit_ensemble(args.out, config)
            weights = ", ".join(f"{k} {v:.2f}" for k, v in summary["weights"].items())
            print(f"ensemble weights {weights}; threshold {summary['threshold']:.3f}; "
                  f"out-of-fold AUROC {summary['oof_auroc']:.3f}")
    except (ConfigError, DatasetError, InitWeightsError) as error:
        raise Fatal(str(error)) from None
    return 0


def _with_init_weights(config, args: argparse.Namespace):  # noqa: ANN001, ANN202
    """The config with the --init-weights flags (which win over its own)."""
    from training.config import ConfigError

    flags = getattr(args, "init_weights", None)
    if not flags:
        return config
    if args.train_command == "detect":
        return config.model_copy(update={"detect": config.detect.model_copy(
            update={"init_weights": flags})})
    starts = dict(config.classify.init_weights)
    for flag in flags:
        member, _, file = flag.partition("=")
        if member not in config.classify.members or not file:
            raise ConfigError(f"--init-weights {flag!r}: want MEMBER=FILE, MEMBER one of "
                              f"{', '.join(config.classify.members)}")
        starts[member] = Path(file)
    return config.model_copy(update={"classify": config.classify.model_copy(
        update={"init_weights": starts})})


def _check_weights(file: Path, architecture: str) -> int:
    from training.init_weights import check

    result = check(file, architecture)
    print(f"{file}: {'fits' if result.ok else 'does NOT fit'} {architecture}: "
          f"{result.summary()}")
    return 0 if result.ok else 1


def add_commands(commands: argparse._SubParsersAction) -> None:
    """train prepare|classify|ensemble|final|detect|export|evaluate|ablate|weights check"""
    train = commands.add_parser("train", help="train a model bundle (VinDr-SpineXR layout)")
    train_commands = train.add_subparsers(dest="train_command", required=True)
    prepare = train_commands.add_parser(
        "prepare", help="read the data set, cache normalised images, YOLO export, folds")
    prepare.add_argument("--data", type=Path, required=True, help="VinDr-SpineXR folder")
    prepare.add_argument("--out", type=Path, required=True, help="run folder")
    prepare.add_argument("--config", dest="train_config", default="paper",
                         help="paper, smoke or a YAML file (default paper)")
    for name, text in (("classify", "train the DERNet members, 5-fold cross-validation"),
                       ("ensemble", "ensemble weights and threshold from the folds"),
                       ("final", "train each member again on all of train, for the epochs "
                                 "cross-validation chose (classify.final_members: retrain)"),
                       ("detect", "train YOLO11 with focal loss, copy-paste, balanced sampling")):
        step = train_commands.add_parser(name, help=text)
        step.add_argument("--out", type=Path, required=True, help="the prepared run folder")
        step.add_argument("--config", dest="train_config", default="paper")
        step.add_argument("--device", default="cpu", help="cpu, or 0 for the first GPU")
        if name == "classify":
            step.add_argument("--init-weights", action="append", default=[],
                              metavar="MEMBER=FILE", help="start MEMBER from this local timm "
                              "checkpoint or safetensors file (repeatable; beside the config's)")
        elif name == "detect":
            step.add_argument("--init-weights", type=Path, metavar="FILE",
                              help="start from this local ultralytics checkpoint")
    weights = train_commands.add_parser("weights", help="pretrained start files")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    weights_check = weights_commands.add_parser(
        "check", help="whether a weights file fits an architecture (missing/unexpected keys)")
    weights_check.add_argument("file", type=Path)
    weights_check.add_argument("--arch", required=True,
                               help="densenet121, tf_efficientnetv2_s, resnet50, yolo11n..x")
    evaluation = train_commands.add_parser("evaluate", help="the bundle on the test split")
    evaluation.add_argument("--out", type=Path, required=True, help="the trained run folder")
    evaluation.add_argument("--data", type=Path, required=True, help="VinDr-SpineXR folder")
    evaluation.add_argument("--config", dest="train_config", default="paper")
    evaluation.add_argument("--bundle", type=Path, help="default RUN/bundle")
    ablation = train_commands.add_parser(
        "ablate", help="the paper's detection ablations: retrain per row, COCOeval on test")
    ablation.add_argument("--out", type=Path, required=True, help="the trained run folder")
    ablation.add_argument("--config", dest="train_config", default="paper")
    ablation.add_argument("--device", default="cpu", help="cpu, or 0 for the first GPU")
    ablation.add_argument("--bundle", type=Path, help="its detector settings (default RUN/bundle)")
    ablation.add_argument("--table", action="append", choices=("additions", "focal", "scales"),
                          help="only this table (repeatable; default all)")
    export = train_commands.add_parser("export", help="write the model bundle from a run")
    export.add_argument("--out", type=Path, required=True, help="the trained run folder")
    export.add_argument("--config", dest="train_config", default="paper")
    export.add_argument("--bundle", type=Path, help="where (default RUN/bundle)")
    export.add_argument("--name", default="spinenode-dernet-yolo11")
    export.add_argument("--version", default="0.1.0")
    train.set_defaults(handler=cmd_train)
