"""Dunning policies: the escalation steps, when each is due, and through which channel.

A policy is read from TOML once, when a run starts, and handed to the workflow whole (name, version
and steps). Editing the file afterwards never changes a running workflow, which is what a finance
team expects: the reminders an invoice was promised are the ones it gets.
"""

from __future__ import annotations

import tomllib
from datetime import datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from models.charges import Fees, FeesError
from models.contact import ContactRules, Overlay, check_rules
from models.duration import Offset, format_offset, parse_offset, read_toml

__all__ = ["Channel", "Offset", "Policy", "PolicyBook", "PolicyError", "Step", "format_offset",
           "load_policies", "load_policy_book", "parse_offset"]

# Reminders are anchored to this local time on the due date unless ``due_at`` pins an instant; a
# payment plan's reminders go out at the same local time.
DEFAULT_SEND_TIME = time(9, 0)


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    VOICE = "voice"
    AGENCY = "agency"


CUSTOMER_CHANNELS = (Channel.EMAIL, Channel.SMS, Channel.VOICE)

# Where a step goes when its own channel cannot reach the customer (no address, opted out,
# address refused by the provider). Overridable per step with ``fallback = [...]``.
DEFAULT_FALLBACK: dict[Channel, tuple[Channel, ...]] = {
    Channel.EMAIL: (Channel.SMS,),
    Channel.SMS: (Channel.EMAIL,),
    Channel.VOICE: (Channel.SMS, Channel.EMAIL),
    Channel.AGENCY: (),
}


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the policy, step and field."""


class Step(BaseModel):
    """One escalation step: what to send, how long after the due date, through which channel."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
    after_due: Offset
    channel: Channel
    template: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
    fallback: tuple[Channel, ...] = ()
    notice: tuple[Channel, ...] = (Channel.EMAIL, Channel.SMS)
    letter: bool = False  # the email carries the formal final notice as a PDF letter

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """A step's template defaults to its name; its fallback to the channel's usual one."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        data.setdefault("template", data.get("name", ""))
        if data.get("fallback") is None and data.get("channel") in set(Channel):
            data["fallback"] = DEFAULT_FALLBACK[Channel(data["channel"])]
        return data

    @model_validator(mode="after")
    def _channels(self) -> Step:
        if self.fallback and (Channel.AGENCY in self.fallback or self.channel is Channel.AGENCY):
            raise ValueError("fallback: the agency is not a fallback, nor has one")
        if Channel.AGENCY in self.notice:
            raise ValueError("notice: the customer is notified by email, sms or voice")
        return self

    @property
    def label(self) -> str:
        """Human wording for summaries: ``sms_reminder`` -> ``sms reminder``."""
        return self.name.replace("_", " ")

    @property
    def when(self) -> str:
        """``day 15`` for whole days after the due date, else the offset (``due-3d``, ``due+15s``)."""
        days, rest = divmod(self.after_due, timedelta(days=1))
        if not rest and days > 0:
            return f"day {days}"
        text = format_offset(self.after_due)
        return f"due{text}" if text.startswith("-") else f"due+{text}"

    @property
    def channels(self) -> tuple[Channel, ...]:
        """The channels to try for this step, in order: its own, then its fallbacks."""
        return tuple(dict.fromkeys([self.channel, *self.fallback]))


class Policy(BaseModel):
    """A named, versioned escalation.

    ``close_after`` is how long a run keeps listening for payments after its last step (an agency
    can still collect long after the handoff). ``agency_notice`` is the least time between the
    last message that reached the customer and a handoff to the agency: no account goes to
    collections without a warning the customer could act on. ``promise_max``, ``plan_grace``
    and ``plan_reminder`` shape promises to pay and payment plans (``models.action``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: Annotated[int, Field(ge=1)]
    steps: Annotated[tuple[Step, ...], Field(min_length=1)]
    close_after: Offset = timedelta(days=180)
    agency_notice: Offset = timedelta(days=14)
    # Below this balance (per currency, a decimal string) the account is not worth an agency:
    # the run ends ``exhausted`` instead of handing off.
    agency_min_balance: dict[str, str] = Field(default_factory=dict)
    promise_max: Offset = timedelta(days=30)  # how far ahead a promise to pay may reach
    plan_grace: Offset = timedelta(days=7)  # an instalment unpaid this long after its date breaks the plan
    plan_reminder: Offset = timedelta(days=3)  # how long before each instalment's date its reminder goes
    # When the customer may be contacted (models.contact): local hours and days, caps per person
    # (or per invoice) and channel, the zone for a customer with neither zone nor phone, how far
    # deferrals to a window's opening are spread, and the stricter rules of regions.
    contact_hours: str = "08:00-21:00"
    contact_days: str = "mon-sun"
    caps: dict[str, str] = Field(default_factory=dict)
    caps_per_invoice: dict[str, str] = Field(default_factory=dict)
    default_timezone: str = "UTC"
    contact_spread: Offset = timedelta(minutes=30)
    consolidate_within: Offset = timedelta(hours=1)  # one message for invoices due this close ("0s": off)
    regions: dict[str, Overlay] = Field(default_factory=dict)
    fees: Fees = Fees()  # a fee per step sent, statutory interest (models.charges)

    @model_validator(mode="after")
    def _minimums(self) -> Policy:
        for currency, amount in self.agency_min_balance.items():
            try:
                ok = len(currency) == 3 and currency.isupper() and Decimal(amount) >= 0
            except InvalidOperation:
                ok = False
            if not ok:
                raise ValueError(f"agency_min_balance: {currency} = {amount!r} is not a currency code "
                                 "with a decimal string such as \"50.00\"")
        return self

    @property
    def contact(self) -> ContactRules:
        """The rules every customer delivery of a run checks before it sends."""
        return ContactRules(hours=self.contact_hours, days=self.contact_days, caps=self.caps,
                            caps_per_invoice=self.caps_per_invoice,
                            default_timezone=self.default_timezone, spread=self.contact_spread,
                            regions=self.regions, consolidate=self.consolidate_within)

    def schedule(self, anchor: datetime) -> list[tuple[Step, datetime]]:
        """When each step is due: the anchor (the due date) plus the step's offset."""
        return [(step, anchor + step.after_due) for step in self.steps]


def _check_steps(policy: Policy) -> None:
    """Rules across steps; raise PolicyError naming the offending step and field."""
    seen: set[str] = set()
    previous: Step | None = None
    for index, step in enumerate(policy.steps):
        where = f"policy {policy.name!r}, step {step.name!r}"
        if step.name in seen:
            raise PolicyError(f"{where}, field 'name': used twice")
        seen.add(step.name)
        if previous is not None and step.after_due <= previous.after_due:
            raise PolicyError(
                f"{where}, field 'after_due': {format_offset(step.after_due)} must come after "
                f"{previous.name!r} ({format_offset(previous.after_due)})"
            )
        if step.channel is Channel.AGENCY and index != len(policy.steps) - 1:
            raise PolicyError(f"{where}, field 'channel': the agency handoff must be the last step")
        previous = step


def _check_templates(policy: Policy, templates_dir: Path) -> None:
    for step in policy.steps:
        if not (templates_dir / f"{step.template}.j2").is_file():
            raise PolicyError(
                f"policy {policy.name!r}, step {step.name!r}, field 'template': no template "
                f"{step.template!r} in {templates_dir}"
            )


def load_policies(path: Path, templates_dir: Path | None = None) -> dict[str, Policy]:
    """Read every ``[policies.NAME]`` table of a TOML file, refusing the file on the first error."""
    document = read_toml(path, "policy file", PolicyError)
    tables = document.get("policies")
    if not isinstance(tables, dict) or not tables:
        raise PolicyError(f"policy file {path} has no [policies.NAME] table")
    defaults, regions = _shared_tables(path, document)
    policies: dict[str, Policy] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise PolicyError(f"policy {name!r}: expected a table")
        table = {**defaults, "regions": regions, **table}
        try:
            check_rules(table, f"policy {name!r}")
        except ValueError as err:
            raise PolicyError(str(err)) from None
        try:
            policy = Policy.model_validate({**table, "name": name})
        except ValidationError as exc:
            raise PolicyError(_describe_policy_error(name, table, exc)) from None
        _check_steps(policy)
        try:
            policy.fees.check(f"policy {name!r}")
        except FeesError as err:
            raise PolicyError(str(err)) from None
        if templates_dir is not None:
            _check_templates(policy, templates_dir)
        policies[name] = policy
    return policies


def _shared_tables(path: Path, document: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``[defaults]`` (fields every policy gets unless it sets its own) and ``[regions.CODE]``
    (stricter contact rules for customers in a country or an ISO 3166-2 region), checked."""
    defaults = document.get("defaults") or {}
    regions = document.get("regions") or {}
    if not isinstance(defaults, dict) or not isinstance(regions, dict):
        raise PolicyError(f"policy file {path}: [defaults] and [regions] must be tables")
    for code, table in regions.items():
        where = f"policy file {path}, region {code!r}"
        if not isinstance(table, dict):
            raise PolicyError(f"{where}: expected a table")
        try:
            check_rules(table, where)
            Overlay.model_validate(table)
        except ValidationError as exc:
            item = exc.errors()[0]
            raise PolicyError(f"{where}, field {'.'.join(map(str, item['loc']))!r}: {item['msg']}") from None
        except ValueError as err:
            raise PolicyError(str(err)) from None
    return defaults, regions


def _describe_policy_error(name: str, table: dict[str, Any], error: ValidationError) -> str:
    item = error.errors()[0]
    loc = list(item["loc"])
    message = item["msg"].removeprefix("Value error, ")
    where = f"policy {name!r}"
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        steps = table.get("steps") or []
        step = steps[loc[1]] if loc[1] < len(steps) else {}
        step_name = step.get("name", f"#{loc[1] + 1}") if isinstance(step, dict) else f"#{loc[1] + 1}"
        where += f", step {step_name!r}"
        loc = loc[2:]
    field = ".".join(str(p) for p in loc) or "steps"
    return f"{where}, field {field!r}: {message}"


# -- choosing a policy for an invoice ------------------------------------------------------------

RULE_KEYS = frozenset({"type", "country", "region", "currency", "amount_below"})


class Rule(BaseModel):
    """``[[rules]] when = {...}; policy = "..."``: every condition must hold."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    when: dict[str, str]
    policy: str

    def matches(self, facts: dict[str, str]) -> bool:
        for key, wanted in self.when.items():
            if key == "amount_below":
                try:
                    if Decimal(facts.get("amount_due", "")) >= Decimal(wanted):
                        return False
                except InvalidOperation:
                    return False
            elif facts.get(key, "").upper() != wanted.upper():
                return False
        return True

    def describe(self) -> str:
        return ", ".join(f"{k} = {v}" for k, v in self.when.items())


class PolicyBook(BaseModel):
    """The policy file as a whole: the policies, the ordered selection rules and the default."""

    model_config = ConfigDict(frozen=True)

    policies: dict[str, Policy]
    rules: tuple[Rule, ...] = ()
    default: str = "standard"

    def choose(self, facts: dict[str, str], *, named: str | None = None,
               override: str | None = None) -> tuple[str, str]:
        """The policy for an invoice and why: the one the invoice names; else the first rule
        that matches; else the customer's own policy; else the default."""
        if named:
            return named, "named by the invoice"
        for number, rule in enumerate(self.rules, start=1):
            if rule.matches(facts):
                return rule.policy, f"rule {number} (when {rule.describe()})"
        if override:
            return override, "the customer's own policy"
        return self.default, "the default policy"


def load_policy_book(path: Path, templates_dir: Path | None = None) -> PolicyBook:
    """The whole policy file: every policy (as :func:`load_policies`), ``[[rules]]`` and
    ``default``; a rule naming an unknown policy or condition is refused, naming the rule."""
    policies = load_policies(path, templates_dir)
    document = tomllib.loads(path.read_text(encoding="utf-8"))
    rules = []
    for number, table in enumerate(document.get("rules") or [], start=1):
        where = f"policy file {path}, rule {number}"
        if not isinstance(table, dict):
            raise PolicyError(f"{where}: expected a table")
        when = table.get("when") or {}
        if not isinstance(when, dict) or not when:
            raise PolicyError(f"{where}, field 'when': give at least one condition")
        unknown = sorted(set(when) - RULE_KEYS)
        if unknown:
            raise PolicyError(f"{where}, field 'when.{unknown[0]}': not a condition "
                              f"(known: {', '.join(sorted(RULE_KEYS))})")
        if "amount_below" in when and "currency" not in when:
            raise PolicyError(f"{where}, field 'when.amount_below': needs a currency beside it")
        try:
            rule = Rule.model_validate({"when": {k: str(v) for k, v in when.items()},
                                        "policy": table.get("policy")})
        except ValidationError as exc:
            raise PolicyError(f"{where}: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
        if rule.policy not in policies:
            raise PolicyError(f"{where}, field 'policy': unknown policy {rule.policy!r}")
        rules.append(rule)
    default = document.get("default", "standard" if "standard" in policies else next(iter(policies)))
    if default not in policies:
        raise PolicyError(f"policy file {path}, field 'default': unknown policy {default!r}")
    return PolicyBook(policies=policies, rules=tuple(rules), default=default)
