"""The plans on sale."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """One plan: its slug is what Kissmetrics sees as the ``plan`` property."""

    slug: str
    name: str
    amount: int
    blurb: str
    features: tuple[str, ...]
    popular: bool = False


PLANS: dict[str, Plan] = {
    plan.slug: plan
    for plan in (
        Plan(
            "starter",
            "Starter",
            19,
            "For a side project and a friend.",
            ("3 boards", "2 members", "Email support"),
        ),
        Plan(
            "pro",
            "Pro",
            49,
            "For a small team that ships every week.",
            ("Unlimited boards", "10 members", "Automations", "Priority support"),
            popular=True,
        ),
        Plan(
            "team",
            "Team",
            99,
            "For several teams sharing a roadmap.",
            ("Everything in Pro", "Unlimited members", "SSO", "Audit log"),
        ),
    )
}
