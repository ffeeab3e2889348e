"""The experiment report as an HTML section with an inline SVG chart (no scripts): used by
`nextbest experiments report --html` and the server's /dashboard."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from nextbest.experiments.report import ExperimentReport, _pct

__all__ = ["experiments_section"]


def _chart(r: ExperimentReport) -> str:
    """Attributed purchases per customer per arm as bars, the lift's interval as text."""
    arms = r.arms
    top = max([a.purchases_per_customer for a in arms] + [1e-9])
    width, bar, gap = 420, 22, 8
    height = len(arms) * (bar + gap) + gap
    rows = []
    for k, a in enumerate(arms):
        y = gap + k * (bar + gap)
        w = 260 * a.purchases_per_customer / top
        colour = "#888" if a.control else "#2b6cb0"
        rows.append(
            f'<text x="0" y="{y + 15}" font-size="12">{escape(a.variant)}</text>'
            f'<rect x="110" y="{y}" width="{w:.1f}" height="{bar}" fill="{colour}"/>'
            f'<text x="{114 + w:.1f}" y="{y + 15}" font-size="12">'
            f"{a.purchases_per_customer:.3f}</text>"
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="attributed purchases per customer, {escape(r.name)}">'
        + "".join(rows)
        + "</svg>"
    )


def experiments_section(reports: Sequence[ExperimentReport]) -> str:
    """An HTML <section> with one table and chart per experiment (aggregates only)."""
    parts = ['<section id="experiments"><h2>Experiments</h2>']
    if not reports:
        parts.append("<p>No experiments configured or recorded.</p>")
    for r in reports:
        srm = "n/a" if r.srm_p is None else f"{r.srm_p:.3g}"
        warn = (
            ' <strong class="srm">sample ratio mismatch: check the assignment</strong>'
            if r.sample_ratio_mismatch
            else ""
        )
        parts.append(
            f'<h3 data-experiment="{escape(r.name)}">{escape(r.name)}</h3>'
            f"<p>Attribution window {r.attribution_days:g} days; control "
            f"{escape(r.control or 'none')}; sample-ratio p = "
            f'<span class="srm-p">{srm}</span>{warn}</p>'
        )
        parts.append(
            "<table><tr><th>variant</th><th>share</th><th>customers</th><th>impressions</th>"
            "<th>attributed purchases</th><th>per customer</th><th>value per customer</th>"
            "<th>conversion</th><th>repeat rate</th><th>churn</th><th>lift</th><th>95% CI</th>"
            "<th>significant</th></tr>"
        )
        for a in r.arms:
            lift = a.purchases_lift
            churn = "n/a" if a.churn_rate is None else f"{a.churn_rate:.3f}"
            ci = "" if lift.low is None else f"{_pct(lift.low)} to {_pct(lift.high)}"
            parts.append(
                f'<tr data-variant="{escape(a.variant)}"><td>{escape(a.variant)}'
                f"{' (control)' if a.control else ''}</td><td>{a.share:.2f}</td>"
                f'<td class="customers">{a.customers}</td>'
                f'<td class="impressions">{a.impressions}</td>'
                f'<td class="attributed">{a.attributed_purchases}</td>'
                f'<td class="per-customer">{a.purchases_per_customer:.4f}</td>'
                f"<td>{a.value_per_customer:.2f}</td><td>{a.conversion:.3f}</td>"
                f"<td>{a.repeat_rate:.3f}</td><td>{churn}</td>"
                f'<td class="lift">{_pct(lift.value)}</td>'
                f'<td class="ci">{ci}</td>'
                f"<td>{'yes' if lift.significant else 'no'}</td></tr>"
            )
        parts.append("</table>")
        parts.append(_chart(r))
    parts.append("</section>")
    return "".join(parts)
