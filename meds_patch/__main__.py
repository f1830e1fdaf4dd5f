"""Commands: ``python -m meds_patch diff | install-hook | demo | report | data | eval``."""

import argparse
import difflib
import os
import sys
import sysconfig

from meds_patch.integration import hook
from meds_patch.tools.data import ALL_SETS, EVAL_SETS, build


def print_diff() -> int:
    """Print the full-context unified diff of the series against the installed upstream."""
    root = hook.upstream_root()
    if root is None:
        print("meds_patch: openrlhf is not installed", file=sys.stderr)
        return 1
    for name, patch in sorted(hook.read_series().items()):
        with open(os.path.join(root, patch.path), encoding="utf-8") as fh:
            upstream = fh.read()
        if hook.sha256_of(os.path.join(root, patch.path)) != patch.sha256:
            print(f"meds_patch: warning: installed {patch.path} differs from {hook.SUPPORTED}", file=sys.stderr)
        old, new = upstream.splitlines(keepends=True), hook.apply_patch(upstream, patch).splitlines(keepends=True)
        sys.stdout.writelines(
            difflib.unified_diff(old, new, f"a/{patch.path}", f"b/{patch.path}", n=max(len(old), len(new)))
        )
    return 0


def install_hook() -> int:
    """Write the hook's .pth into site-packages: an editable install (PEP 660) does not place it itself."""
    source = os.path.join(os.path.dirname(os.path.abspath(hook.__file__)), "meds_patch_hook.pth")
    target = os.path.join(sysconfig.get_paths()["purelib"], "meds_patch_hook.pth")
    with open(source, encoding="utf-8") as fh:
        text = fh.read()
    if not os.path.exists(target) or open(target, encoding="utf-8").read() != text:
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(text)
    print(f"meds_patch: import hook at {target}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # What follows "--" reaches a recipe (demo --recipe) after its own flags.
    argv, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m meds_patch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("diff", help="print the patch series as a full-context diff against the installed openrlhf")
    sub.add_parser("install-hook", help="place the import hook's .pth in site-packages (for editable installs)")
    demo = sub.add_parser(
        "demo", help="run upstream's train_ppo_ray --meds on CPU as a Ray job (local cluster, vLLM, tiny model)"
    )
    demo.add_argument("--steps", type=int, default=6, help="training steps to run (default: 6)")
    demo.add_argument("--save", default=None, help="run folder: DIR/ckpt, DIR/tensorboard, DIR/job.log")
    demo.add_argument("--resume", default=None, help="a run folder of an earlier demo to continue for --steps more")
    demo.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="Ray nodes on this machine, one policy rank on each (default: 1, or the resumed run's)",
    )
    demo.add_argument(
        "--address", default=None, help="train on this running Ray cluster's job API (http://HOST:PORT) instead"
    )
    demo.add_argument(
        "--alpha", type=float, default=None, help="--algo.meds.alpha (default: the trainer's, or the resumed run's)"
    )
    demo.add_argument(
        "--recipe",
        default=None,
        help="run this GPU recipe script (examples/scripts/train_meds_*.sh) unchanged on the CPU, its flags last but "
        "the CPU's own and the arguments after --; ALGO, MEDS and ALPHA from the environment",
    )
    report = sub.add_parser("report", help="summarise a checkpoint's error memory as Markdown and PNG plots")
    report.add_argument("checkpoint", help="--ckpt.path of a run, its _actor folder, or one checkpoint tag folder")
    report.add_argument("--out", default=None, help="output folder (default: <checkpoint>/meds_report)")
    data = sub.add_parser("data", help="build the recipes' training and evaluation JSONL files from the Hub")
    data.add_argument("--out", default=os.path.expanduser("~/data"), help="output folder (default: ~/data)")
    data.add_argument(
        "--sets",
        nargs="+",
        choices=ALL_SETS,
        default=ALL_SETS,
        metavar="SET",
        help=f"any of {', '.join(ALL_SETS)} (default: all)",
    )
    evaluation = sub.add_parser(
        "eval",
        help="pass@1 and pass@k of model folders on the evaluation sets, with vLLM offline (the paper's Table 1)",
    )
    evaluation.add_argument(
        "--model", action="append", required=True, metavar="DIR",
        help="a Hugging Face model folder; repeat for more: the first is the baseline the others are compared with",
    )  # fmt: skip
    evaluation.add_argument(
        "--sets", nargs="+", default=EVAL_SETS, metavar="NAME",
        help=f"evaluation sets, files NAME.jsonl in --data (default: {' '.join(EVAL_SETS)})",
    )  # fmt: skip
    evaluation.add_argument(
        "--data", default=os.path.expanduser("~/data"), help="folder of the sets (default: ~/data)"
    )
    evaluation.add_argument("--out", required=True, help="output folder; the same command again continues a run")
    evaluation.add_argument("--n", type=int, default=128, help="samples per question (default: 128)")
    evaluation.add_argument("--temperature", type=float, default=1.0, help="(default: 1.0)")
    evaluation.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    evaluation.add_argument("--max-tokens", type=int, default=8192, help="new tokens per sample (default: 8192)")
    evaluation.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default: 0)")
    evaluation.add_argument(
        "--template", default=None,
        help="prompt with one {} for the question, {{ }} for literal braces (default: the recipes' Qwen-Math prompt)",
    )  # fmt: skip
    evaluation.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model (default: 1)")
    args = parser.parse_args(argv)
    if args.command == "diff":
        return print_diff()
    if args.command == "install-hook":
        return install_hook()
    if args.command == "data":
        print(build(args.out, args.sets))
        return 0
    if args.command == "eval":
        from meds_patch.tools.evaluate import QWEN_MATH_TEMPLATE, InputError, evaluate

        try:
            markdown = evaluate(
                args.model, args.data, args.out, sets=args.sets, template=args.template or QWEN_MATH_TEMPLATE,
                n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
                tensor_parallel_size=args.tensor_parallel_size,
            )  # fmt: skip
        except InputError as error:
            evaluation.error(str(error))
        print(markdown)
        return 0
    if args.command == "report":
        from meds_patch.tools.report import write_report

        print(write_report(args.checkpoint, args.out))
        return 0
    from meds_patch.cpu.demo import run_demo, run_recipe

    if args.recipe is not None:
        options = {"--resume": args.resume, "--nodes": args.nodes, "--address": args.address, "--alpha": args.alpha}
        given = [flag for flag, value in options.items() if value is not None]
        if given:
            parser.error(f"{', '.join(given)} cannot be used with --recipe (set ALPHA in the environment for --alpha)")
        return run_recipe(args.recipe, args.steps, args.save, extra)
    if extra:
        parser.error(f"arguments after -- go to a recipe: {' '.join(extra)} given without --recipe")
    if args.nodes is not None and args.nodes < 1:
        parser.error(f"--nodes must be 1 or more, not {args.nodes}")

    return run_demo(args.steps, args.save, args.resume, args.nodes, args.address, args.alpha)


if __name__ == "__main__":
    sys.exit(main())
