"""Is a new result a record? One-sided t-test of the per-seed gain over the current record.

The challenge asks a new record to beat the current one by at least 0.005 nats of val_loss
at p < 0.01. Per seed, gain = record_val_loss - seed_val_loss (nats/token). The test is a
one-sample t-test of H0: mean gain <= MIN_GAIN against H1: mean gain > MIN_GAIN with n-1
degrees of freedom; the record passes when p < ALPHA.

Records are usually quoted in bits per byte. Given --record-bpb, the record is converted to
nats with this submission's own tokens/bytes ratio (read from the scoring eval line):
val_loss = val_bpb * ln(2) * bytes / tokens. That is exact when both runs share the
tokenizer and validation set; across tokenizers it states the record's bpb in this
tokenizer's nats, which is the only comparison bpb supports.
"""

import argparse
import math
import sys

from logparse import LogError, check_consistent, mean_std, parse_log

MIN_GAIN = 0.005
ALPHA = 0.01


def t_sf(t, df):
    """P(T > t) for Student's t with integer df, in closed form (Abramowitz & Stegun 26.7.3-4).

    Closed form because df = seeds - 1 is always a small integer, and it keeps scipy optional.
    """
    if df < 1 or df != int(df):
        raise ValueError("df must be a positive integer")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        # A = (2/pi) * (theta + sin*cos * (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...)), (df-3)/2 terms after the 1
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    else:
        # A = sin * (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ...), (df-2)/2 terms after the 1
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = math.sin(theta) * total
    # A = P(|T| < |t|)
    upper = (1 - a) / 2
    return upper if t >= 0 else 1 - upper


def gain_ttest(gains, min_gain=MIN_GAIN, alpha=ALPHA):
    """One-sided one-sample t-test of mean(gains) > min_gain; returns every number it used."""
    n = len(gains)
    if n < 2:
        raise ValueError("need at least 2 seeds for a t-test")
    mean, std = mean_std(gains)
    if std == 0:  # t would be infinite: identical results are one model scored twice, not n seeds
        raise ValueError(f"the {n} gains are identical ({gains[0]:+.8f} nats): zero spread is no sample of seeds")
    t = (mean - min_gain) / (std / math.sqrt(n))
    p = t_sf(t, n - 1)
    return {"n": n, "mean_gain_nats": mean, "std_gain_nats": std, "t": t, "df": n - 1,
            "p_value": p, "min_gain_nats": min_gain, "alpha": alpha, "passed": p < alpha}


def record_val_loss_for(run, record_val_loss=None, record_bpb=None):
    """The record's value in nats/token; bpb is converted with this run's tokens/bytes."""
    if (record_val_loss is None) == (record_bpb is None):
        raise ValueError("give exactly one of record_val_loss, record_bpb")
    if record_val_loss is not None:
        return record_val_loss
    return record_bpb * math.log(2) / run.tokens_per_byte


def significance_from_runs(runs, record_val_loss=None, record_bpb=None, min_gain=MIN_GAIN, alpha=ALPHA):
    check_consistent(runs)
    gains = [record_val_loss_for(r, record_val_loss, record_bpb) - r.score["val_loss"] for r in runs]
    res = gain_ttest(gains, min_gain, alpha)
    res["record_val_loss"] = record_val_loss_for(runs[0], record_val_loss, record_bpb)
    res["record_bpb"] = record_bpb
    res["gains_nats"] = gains
    res["seeds"] = [r.seed for r in runs]
    return res


def format_result(res):
    """Human-readable lines; make_record puts the same text in the record README."""
    rec = f"{res['record_val_loss']:.8f} nats"
    if res["record_bpb"] is not None:
        rec += f" (from {res['record_bpb']} bpb at this run's tokens/bytes)"
    verdict = "PASS" if res["passed"] else "FAIL"
    gains = ", ".join(f"{s}:{g:+.5f}" for s, g in zip(res["seeds"], res["gains_nats"]))
    return [
        f"record val_loss: {rec}",
        f"gain per seed (nats): {gains}",
        f"mean gain: {res['mean_gain_nats']:.5f} nats, std {res['std_gain_nats']:.5f}, n={res['n']}",
        f"H0: mean gain <= {res['min_gain_nats']} nats; t = {res['t']:.3f}, df = {res['df']}, one-sided p = {res['p_value']:.3g}",
        f"verdict: {verdict} (needs p < {res['alpha']})",
    ]


def add_record_args(ap):
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--record-val-loss", type=float, help="current record's val_loss in nats/token")
    g.add_argument("--record-bpb", type=float, help="current record's val_bpb (converted with the logs' tokens/bytes)")
    ap.add_argument("--min-gain", type=float, default=MIN_GAIN, help="required improvement in nats (default %(default)s)")
    ap.add_argument("--alpha", type=float, default=ALPHA, help="significance level (default %(default)s)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Exit status 0 when the result passes, 1 when it does not, 2 on bad input.")
    ap.add_argument("logs", nargs="+", help="one log per seed")
    add_record_args(ap)
    args = ap.parse_args(argv)
    if args.record_val_loss is None and args.record_bpb is None:
        ap.error("give --record-val-loss or --record-bpb")
    try:
        res = significance_from_runs([parse_log(p) for p in args.logs], args.record_val_loss,
                                     args.record_bpb, args.min_gain, args.alpha)
    except (LogError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(format_result(res)))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
