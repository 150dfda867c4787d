"""``det-mmdet``: resolve, print and train MMDetection experiments with Determined, locally.

    det-mmdet train EXPERIMENT.yaml --print-config [--set key=value ...]
    det-mmdet train EXPERIMENT.yaml [--max-batches N | --max-epochs N] [--validation-period N]
        [--checkpoint-period N] [--output-dir DIR] [--slots K] [--resume] [--set key=value ...]
    det-mmdet check EXPERIMENT.yaml
    det-mmdet compose model=rtmdet data=custom searcher=asha [key=value ...] [-o exp.yaml] [--submit]
    det-mmdet demo

Bad input ends with one line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from det_mmdet.errors import UserError, one_line

logger = logging.getLogger("det_mmdet")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler:
            # To the stderr of now, not of the first call: a later main() in the same process (a notebook, a
            # test) may run with another one. Assigned, not setStream(): that flushes the old one, maybe closed.
            handler.stream = sys.stderr


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    """Training length, periods and overrides: shared with the cluster entrypoint (model_def/train.py)."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override applied after override_mmdet_config (repeatable)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-batches", type=int)
    length.add_argument("--max-epochs", type=int)
    p.add_argument("--validation-period", type=int, metavar="BATCHES")
    p.add_argument("--checkpoint-period", type=int, metavar="BATCHES")
    p.add_argument("--report-period", type=int, metavar="BATCHES", help="training metrics every N batches (100)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="Determined experiment YAML")
    p.add_argument("--print-config", action="store_true", help="print the resolved mmdet config and exit")
    add_schedule_args(p)
    p.add_argument("--output-dir", type=Path, help="default: ./runs/<name>-<time>")
    p.add_argument("--slots", type=int, default=1, help="local processes (gloo on CPU, nccl on GPU)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--verbose", action="store_true", help="also the libraries' own output (pycocotools, mmengine)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="det-mmdet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train an experiment locally, or print its resolved config")
    add_train_args(train)
    train.set_defaults(func=cmd_train)
    demo = sub.add_parser("demo", help="make a toy data set, train a small detector, draw the results")
    demo.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    demo.add_argument("--data-dir", type=Path, default=Path("data/shapes"))
    demo.add_argument("--max-batches", type=int)
    demo.add_argument("--verbose", action="store_true", help="also the libraries' own output (mmengine, mmdet)")
    demo.set_defaults(func=cmd_demo)

    export = sub.add_parser("export", help="model.pth + config.py from a checkpoint or run directory")
    export.add_argument(
        "checkpoint", type=Path, help="a checkpoint directory, a run's --output-dir, or a Runner checkpoint / work_dir"
    )
    export.add_argument("--out", type=Path, help="the model directory to write")
    export.add_argument(
        "--mmengine", type=Path, metavar="OUT.pth", help="write a checkpoint mmengine's Runner resumes from instead"
    )
    export.set_defaults(func=cmd_export)
    predict = sub.add_parser("predict", help="draw predictions and write COCO results.json")
    predict.add_argument("model", type=Path, help="a model directory (det-mmdet export) or checkpoint")
    predict.add_argument("inputs", nargs="+", help="images, folders, s3:// or gs:// URIs")
    predict.add_argument("--out", type=Path, required=True)
    predict.add_argument("--score-thr", type=float, default=0.3)
    predict.add_argument("--verbose", action="store_true", help="also the libraries' own output (mmengine, mmdet)")
    predict.set_defaults(func=cmd_predict)
    evaluate = sub.add_parser("evaluate", help="COCO AP/AR of a model, or of a results file, on a labelled set")
    evaluate.add_argument("model", type=Path, nargs="?", help="a model directory (det-mmdet export) or checkpoint")
    evaluate.add_argument("--ann", type=Path, required=True, help="COCO annotation file")
    evaluate.add_argument("--images", type=Path, help="image folder (file_name is relative to it); with a model")
    evaluate.add_argument("--results", type=Path, help="a COCO results file to score instead of a model")
    evaluate.add_argument("--out", type=Path, help="also write metrics.json and per_class_ap.md here")
    evaluate.add_argument(
        "--coco-backend", choices=("hotcoco", "faster-coco-eval", "pycocotools"), help="COCOeval to use (hotcoco)"
    )
    evaluate.add_argument("--verbose", action="store_true", help="also the libraries' own output (mmengine, mmdet)")
    evaluate.set_defaults(func=cmd_evaluate)
    check = sub.add_parser("check", help="what can be known before det experiment create: configs, models, paths")
    check.add_argument("experiment", help="Determined experiment YAML")
    check.set_defaults(func=cmd_check)
    compose = sub.add_parser("compose", help="a Determined experiment from config groups (experiments/hydra/)")
    compose.add_argument("overrides", nargs="*", metavar="GROUP=OPTION|KEY=VALUE")
    compose.add_argument("-o", "--out", type=Path, help="write the experiment YAML here instead of printing it")
    compose.add_argument("--submit", action="store_true", help="create it on the master named by DET_MASTER")
    compose.set_defaults(func=cmd_compose)
    convert = sub.add_parser("convert", help="Pascal VOC XML, KITTI or YOLO labels to a COCO annotation file")
    convert.add_argument("format", choices=("voc", "kitti", "yolo"))
    convert.add_argument("src", type=Path, help="folder of label files")
    convert.add_argument("--images", type=Path, required=True, help="folder of the images the labels describe")
    convert.add_argument("--out", type=Path, required=True, help="COCO annotation file to write")
    convert.add_argument("--classes", help="comma-separated class names, in label order (default: first seen)")
    convert.add_argument("--strict", action="store_true", help="any annotation that cannot be converted is an error")
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if getattr(args, "verbose", False):
            os.environ["DET_MMDET_VERBOSE"] = "1"  # logs.VERBOSE_ENV: library output too, here and in workers
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------


def resolve(args: argparse.Namespace):
    from det_mmdet.config import build_config, load_experiment, parse_set

    exp = load_experiment(args.experiment)
    applied = apply_entrypoint_args(args, exp.config, str(args.experiment))
    if is_chief():
        for note in exp.notes:
            logger.info(note)
        if applied:
            logger.info(applied)
    return exp, build_config(exp, parse_set(args.set))


SCHEDULE_FLAGS = ("max_batches", "max_epochs", "validation_period", "checkpoint_period", "report_period")


def entrypoint_args(exp_conf: dict, where: str) -> list[str]:
    """The arguments the experiment's ``entrypoint`` gives ``train.py`` (what the cluster runs)."""
    import shlex

    entry = exp_conf.get("entrypoint")
    if not entry:
        return []
    try:
        words = list(entry) if isinstance(entry, list) else shlex.split(str(entry))
    except ValueError as e:
        raise UserError(f"{where}: entrypoint {entry!r}: {e}") from None
    scripts = [i for i, w in enumerate(words) if Path(str(w)).name == "train.py"]
    return [str(w) for w in words[scripts[0] + 1 :]] if scripts else []


def apply_entrypoint_args(args: argparse.Namespace, exp_conf: dict, where: str) -> str:
    """Give ``args`` the entrypoint's schedule flags and ``--set`` items; the command line's own win.

    Returns the start-up line that says what was taken, or "" when the entrypoint gives nothing.
    """
    words = entrypoint_args(exp_conf, where)
    if not words:
        return ""
    parser = argparse.ArgumentParser(prog="train.py", add_help=False, exit_on_error=False)
    add_schedule_args(parser)
    try:
        entry, unknown = parser.parse_known_args(words)
    except (argparse.ArgumentError, SystemExit) as e:
        raise UserError(f"{where}: entrypoint arguments {' '.join(words)!r}: {e}") from None
    if unknown:
        raise UserError(f"{where}: entrypoint: train.py does not take {' '.join(unknown)!r}")
    taken, overridden = [], []
    if args.max_batches is not None or args.max_epochs is not None:  # one length: the command line's
        overridden += [f"--{n.replace('_', '-')}" for n in ("max_batches", "max_epochs") if getattr(entry, n)]
        entry.max_batches = entry.max_epochs = None
    for name in SCHEDULE_FLAGS:
        value, flag = getattr(entry, name), "--" + name.replace("_", "-")
        if value is None:
            continue
        if getattr(args, name) is None:
            setattr(args, name, value)
            taken.append(f"{flag} {value}")
        else:
            overridden.append(flag)
    if entry.set:
        args.set = [*entry.set, *args.set]  # later wins: the command line's --set after the entrypoint's
        taken += [f"--set {item}" for item in entry.set]
    if not taken and not overridden:
        return ""
    line = f"entrypoint arguments applied, as on a cluster: {' '.join(taken) or 'none'}"
    return line + (f" (the command line's {', '.join(overridden)} win)" if overridden else "")


def is_chief() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    if args.verbose:
        from det_mmdet import logs

        os.environ[logs.VERBOSE_ENV] = "1"  # library output too, in this process and the workers
    exp, cfg = resolve(args)
    if args.print_config:
        from det_mmdet.config import pretty_text

        print(pretty_text(cfg))
        return 0
    if args.slots < 1:
        raise UserError(f"--slots must be at least 1, got {args.slots}")
    if args.resume and args.output_dir is None:
        raise UserError("--resume needs --output-dir (the run to continue)")
    output_dir = args.output_dir or Path("runs") / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.slots > 1 and "RANK" not in os.environ:
        from det_mmdet.knobs import with_global_batch_size
        from det_mmdet.trial import per_slot_batch_size

        hparams = with_global_batch_size(exp.hparams, args.slots)
        per_slot_batch_size(int(hparams["global_batch_size"]), args.slots)  # fail before spawning
        return launch_workers(args, output_dir)
    return train_local(
        exp,
        cfg,
        output_dir,
        max_batches=args.max_batches,
        max_epochs=args.max_epochs,
        validation_period=args.validation_period,
        checkpoint_period=args.checkpoint_period,
        report_period=args.report_period,
        resume=args.resume,
    )


def train_local(
    exp,
    cfg,
    output_dir: Path,
    *,
    max_batches: int | None = None,
    max_epochs: int | None = None,
    validation_period: int | None = None,
    checkpoint_period: int | None = None,
    report_period: int | None = None,
    resume: bool = False,
) -> int:
    """Train ``cfg`` in Determined's local mode (this process is one slot when WORLD_SIZE is set)."""
    output_dir = output_dir.resolve()
    from determined import core

    from det_mmdet import checkpoint, local, runner
    from det_mmdet.config import pretty_text
    from det_mmdet.trial import MMDetTrial

    plan = runner.schedule(
        cfg, exp.config, max_batches, max_epochs, validation_period, checkpoint_period, report_period
    )
    latest, resume_at = None, 0
    if resume:
        newest = checkpoint.newest_checkpoint(output_dir / "checkpoints")
        if newest is None:
            raise UserError(f"--resume: no complete checkpoint in {output_dir / 'checkpoints'}")
        latest, resume_at = newest.name, checkpoint.steps_completed(newest)
        if is_chief():
            logger.info("resumed from batch %d (checkpoint %s)", resume_at, newest)

    distributed = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from det_mmdet.environment import init_process_group

        started = init_process_group((cfg.get("env_cfg") or {}).get("dist_cfg"))
        distributed = core.DistributedContext.from_torch_distributed()
        if is_chief():
            logger.info("env_cfg: %s", started)

    output_dir.mkdir(parents=True, exist_ok=True)
    if is_chief():
        (output_dir / "config.py").write_text(pretty_text(cfg))
        logger.info("training %s -> %s", exp.name, output_dir)
    accumulate = runner.aggregation_frequency(cfg)
    from det_mmdet.knobs import with_global_batch_size

    hparams = with_global_batch_size(exp.hparams, distributed.get_size() if distributed else 1)
    keep = ((cfg.get("default_hooks") or {}).get("checkpoint") or {}).get("max_keep_ckpts")
    keep = int(keep) if keep and int(keep) > 0 else None
    with local.local_context(
        hparams, exp.config, output_dir, distributed, accumulate, keep_checkpoints=keep
    ) as context:
        trial = MMDetTrial(context, cfg, plan, output_dir)
        runner.fit(trial, context, plan, latest, resume_at_batch=resume_at)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(args: argparse.Namespace, output_dir: Path) -> int:
    """One process per slot with torchrun's environment; any failure stops them all."""
    argv = list(args.argv)
    if args.output_dir is None:
        argv += ["--output-dir", str(output_dir)]
    port = free_port()
    procs = []
    for rank in range(args.slots):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(args.slots),
            LOCAL_WORLD_SIZE=str(args.slots),
            GROUP_RANK="0",
            GROUP_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            USE_TORCH_DISTRIBUTED="1",
        )
        # As torchrun does: K processes each with all cores' threads would oversubscribe the CPU.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.slots)))
        procs.append(subprocess.Popen([sys.executable, "-m", "det_mmdet.cli", *argv], env=env))
    code = 0
    while procs:
        for p in list(procs):
            rc = p.poll()
            if rc is None:
                continue
            procs.remove(p)
            if rc != 0 and code == 0:
                code = rc
                for other in procs:
                    other.terminate()
        time.sleep(0.2)
    return code


def cmd_export(args: argparse.Namespace) -> int:
    setup_logging()
    from det_mmdet.export import export, export_mmengine

    if (args.out is None) == (args.mmengine is None):
        raise UserError("export: give --out DIR (a model directory) or --mmengine OUT.pth (a Runner checkpoint)")
    if args.mmengine is not None:
        export_mmengine(args.checkpoint, args.mmengine)
    else:
        export(args.checkpoint, args.out)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    setup_logging()
    from det_mmdet.export import predict

    if not 0 <= args.score_thr <= 1:
        raise UserError(f"--score-thr must be within 0..1, got {args.score_thr}")
    predict(args.model, args.inputs, args.out, args.score_thr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    setup_logging()
    from det_mmdet.export import evaluate, evaluate_results

    if args.results is not None:
        if args.model is not None:
            raise UserError("evaluate: give a model or --results, not both")
        evaluate_results(args.results, args.ann, args.out, args.coco_backend)
        return 0
    if args.model is None or args.images is None:
        raise UserError("evaluate: give a model and --images, or --results")
    evaluate(args.model, args.ann, args.images, args.out, backend=args.coco_backend)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    setup_logging()
    from det_mmdet import check

    return check.run(args.experiment)


def cmd_compose(args: argparse.Namespace) -> int:
    from det_mmdet.compose import compose_experiment, submit, write

    experiment = compose_experiment(list(args.overrides))
    text = write(experiment, args.out)
    if args.out is None:
        print(text, end="")
    if args.submit:
        import tempfile

        from det_mmdet import check

        setup_logging()
        with tempfile.TemporaryDirectory() as tmp:  # check reads an experiment file, as det would
            composed = Path(args.out) if args.out else Path(tmp) / "experiment.yaml"
            if args.out is None:
                composed.write_text(text)
            if check.run(composed) != 0:
                raise UserError("compose --submit: det-mmdet check found problems (above); nothing submitted")
        print(f"created experiment {submit(experiment)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from det_mmdet.convert import convert, write

    classes = [c.strip() for c in args.classes.split(",")] if args.classes is not None else None
    conversion = convert(args.format, args.src, args.images, classes=classes, strict=args.strict)
    write(conversion, args.out)
    print(conversion.summary())
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    setup_logging()
    from det_mmdet import demo

    return demo.run(args.output_dir, args.data_dir, args.max_batches)


if __name__ == "__main__":
    sys.exit(main())
