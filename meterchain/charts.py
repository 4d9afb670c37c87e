"""Charts people read: matplotlib figures with hourly UTC time axes, stable colours, inline SVG.

matplotlib (Agg-free: `Figure` objects and the SVG backend, no pyplot state)
does the axes, ticks, negative values and legends. Every series name keeps
its colour across reports: fixed names have fixed colours, a participant's
colour comes from a stable hash of its name. `svg(figure)` returns text
that embeds in HTML and is byte-identical for the same figure.
"""

from __future__ import annotations

import datetime as dt
import io
import zlib
from collections.abc import Iterable, Sequence

import matplotlib
from matplotlib import dates as mdates
from matplotlib import ticker
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from meterchain.times import iso_utc

HOUR_S = 3600
WIDTH_IN, HEIGHT_IN = 10.0, 4.4  # one chart; the HTML report scales it to its box

# Names that mean the same thing in every report keep one colour.
FIXED_COLOURS = {
    "without trading": "#9e9e9e",
    "with trading": "#2e7d32",
    "retail price": "#c62828",
    "feed-in tariff": "#ef6c00",
    "held": "#2e7d32",
    "retired": "#795548",
}
# Colour-blind-friendly palette (Okabe-Ito, then Tableau) for participants and pairs.
PALETTE = (
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#4e79a7",
    "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#ff9da7", "#9c755f", "#17becf",
)  # fmt: skip


def colour(name: str) -> str:
    """The colour of a series: fixed for the names above, else a stable hash of the name."""
    return FIXED_COLOURS.get(name) or PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def colours(names: Iterable[str]) -> dict[str, str]:
    """Colours for names drawn together: each keeps its own unless two would collide.

    A collision moves the later name (in sorted order) to the next free colour,
    so a given set of names always gets the same colours.
    """
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in sorted(names):
        choice = colour(name)
        if choice in used and name not in FIXED_COLOURS:
            start = PALETTE.index(choice)
            free = [PALETTE[(start + k) % len(PALETTE)] for k in range(1, len(PALETTE))]
            choice = next((c for c in free if c not in used), choice)
        out[name] = choice
        used.add(choice)
    return out


def figure(rows: int = 1) -> tuple[Figure, list[Axes]]:
    """A report-sized figure with `rows` stacked axes sharing the x axis, laid out to fit."""
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(axis="y", color="#e0e0e0", linewidth=0.8)
        ax.set_axisbelow(True)
    return fig, list(axes)


def hour_edges(hours: Sequence[int]) -> list[float]:
    """matplotlib date numbers of each hour's start (hours since the epoch), then the last end."""
    if not hours:
        return []
    return [mdates.date2num(_utc(h)) for h in (*hours, hours[-1] + 1)]


def hour_axis(ax: Axes, hours: Sequence[int]) -> None:
    """An x axis of hours (hours since the epoch): HH:MM ticks, the UTC date span as its label."""
    if not hours:
        ax.set_xlabel("no hours on the ledger")
        return
    first, last = hours[0], hours[-1] + 1
    ax.set_xlim(mdates.date2num(_utc(first)), mdates.date2num(_utc(last)))
    span = last - first
    step = next(s for s in (1, 2, 3, 4, 6, 12, 24, 48, 168) if span / s <= 12 or s == 168)
    ax.xaxis.set_major_locator(mdates.HourLocator(interval=step, tz=dt.UTC))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(_hour_label))
    ax.set_xlabel(
        f"hour (UTC), {iso_utc(first * HOUR_S)} to {iso_utc(last * HOUR_S)}; "
        "each bar covers its hour"
    )


def _hour_label(x: float, pos: int | None = None) -> str:
    """HH:MM, except a midnight after the first tick, which shows its date (MM-DD)."""
    when = mdates.num2date(x, tz=dt.UTC)
    return when.strftime("%m-%d" if (when.hour, when.minute) == (0, 0) and pos else "%H:%M")


def integer_axis(ax: Axes) -> None:
    """Only whole-number ticks (counts), and a visible range when every value is zero."""
    ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    low, high = ax.get_ylim()
    if high - low < 1:
        ax.set_ylim(min(low, 0), max(high, 1))


def zero_line(ax: Axes) -> None:
    """A line at zero, so positive and negative bars read against it."""
    ax.axhline(0, color="black", linewidth=0.8)


def legend_outside(ax: Axes, title: str | None = None, extra: Sequence[Artist] = ()) -> None:
    """Legend to the right of the plot area, so it never covers data or another label.

    `extra` adds entries that explain a style rather than a series (e.g. hatched = cleared).
    """
    handles, labels = ax.get_legend_handles_labels()
    handles += list(extra)
    labels += [str(a.get_label()) for a in extra]
    if handles:
        ax.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False, fontsize="small")  # fmt: skip


def empty_note(ax: Axes, text: str) -> None:
    """Say in the chart why it has nothing to show (an empty chart must not look broken)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#616161")


def svg(fig: Figure) -> str:
    """The figure as an inline `<svg>` element: text kept as text, no date stamp, stable ids."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "meterchain"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _utc(hour: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(hour * HOUR_S, dt.UTC)
