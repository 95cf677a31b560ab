"""Draw training and validation loss curves from one or more run logs into a PNG.

matplotlib is optional for the project (nothing the competition run needs depends on it):
without it this tool exits with a message saying how to install it.
"""

import argparse
import os
import sys

from logparse import LogError, parse_log


class MissingMatplotlib(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib("matplotlib is not installed (pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def run_label(run):
    return run.run_id or os.path.basename(run.path)


def plot_curves(runs, out_path, x="step"):
    """Train loss (lines), validation loss (dots) and the scored final eval (star) per run, against
    step or train time (s)."""
    plt = _pyplot()
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    def xs(points):
        return [p["step"] if x == "step" else p["train_time"] / 1000 for p in points]

    for run in runs:
        label = run_label(run)
        line, = ax_train.plot(xs(run.train_steps), [p["train_loss"] for p in run.train_steps], label=label, lw=1, marker=".", ms=2)
        ax_val.plot(xs(run.val_steps), [p["val_loss"] for p in run.val_steps], "o-", color=line.get_color(),
                    label=label, ms=3)
        if run.score and run.last_step_line:
            # The scored eval (often the only validation with VAL_LOSS_EVERY=0), at the last step.
            ax_val.plot(xs([run.last_step_line]), [run.score["val_loss"]], "*", color=line.get_color(), ms=9)
    xlabel = "step" if x == "step" else "train time (s)"
    for ax, title in ((ax_train, "train loss"), (ax_val, "validation loss (nats/token; star: scored eval)")):
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if runs:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", help="log files (logs/<RUN_ID>.txt)")
    ap.add_argument("-o", "--out", default="curves.png", help="PNG to write (default %(default)s)")
    ap.add_argument("--x", choices=["step", "time"], default="step", help="x axis: optimizer step or training seconds")
    args = ap.parse_args(argv)
    try:
        plot_curves([parse_log(p) for p in args.logs], args.out, args.x)
    except MissingMatplotlib as e:
        print(f"error: {e}; no plot drawn", file=sys.stderr)
        return 2
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.out}: cannot write: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
