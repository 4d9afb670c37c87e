"""`meterchain site init DIR`: every file a market site needs, from nothing, in one folder.

For N microgrids of which K+1 are consensus members it writes (see
`meterchain.site.layout` for the folder) the site CA and the broker's TLS
certificate; a Mosquitto configuration with one password and one ACL block per
client (files 0600, owned by the user the broker runs as); the regulator's and
every node's P-256 key (secrets, 0600, apart from the configurations); the
regulator-signed membership, the participants file and the meter registry;
the genesis transactions (the regulator admits every microgrid and registers
every meter); one agent configuration per microgrid (market model, typical-day
forecast profile, role node or submitter), the aggregator configuration and
systemd units for the site's paths. With `--emulated` it also provisions one
emulated board per meter (each generates its own key on first boot; only the
public key is read) and the lab file that runs them against emulated SDM630s.

The microgrids are the reference day's four (`meterchain.market.reference`)
when N = 4, otherwise a seeded synthetic case. An accelerated market clock
(`--speed`, a lab) scales the market timers so that real-time network bounds
keep their meaning.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from meterchain import codec
from meterchain.keys import PrivateKey
from meterchain.ledger.transactions import signed
from meterchain.market.rolling import MicrogridDay
from meterchain.mqtt_auth import check_name, meter_acl, node_acl, password_line
from meterchain.quorum import Member, Membership
from meterchain.registry import entry_text, make_meter
from meterchain.site.clock import MarketClock
from meterchain.site.layout import AGGREGATOR_ID, REGULATOR_ID, SITE_FILE, Site, SiteError, Timing

HOUR = 3600
DAY_START = 1_718_064_000  # 2024-06-11T00:00:00Z, the reference day of a lab site
LAB_SPEED = 1440.0  # a day in a minute


@dataclass(frozen=True)
class InitOptions:
    microgrids: int = 4
    members: int = 3  # K + 1 consensus members; the other microgrids only submit
    market: str = "lab"
    emulated: bool = False
    speed: float = 1.0  # market clock speed (1: real time)
    broker: str = ""  # an external broker mqtt(s)://[user:pass@]host:port; "": our own Mosquitto
    host: str = "127.0.0.1"  # where our own Mosquitto listens
    port: int = 0  # 0: a free port now
    ca_file: Path | None = None  # the external broker's CA (mqtts://)


@dataclass(frozen=True)
class MeterPlan:
    id: str
    owner: str
    source: str  # "pv" / "wind" (export), "load" (import), "bidir" (point of common coupling)
    power_w: tuple[int, ...]  # lab: 24 hourly values, + import / - export


def _private(path: Path, data: bytes | str) -> None:
    """Write a secret: created 0600 (never readable by others, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)


def _public(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_table(name: str, values: dict[str, object], *, array: bool = False) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    body = "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items() if v is not None)
    return f"{head}\n{body}\n"


def clock_table(clock: MarketClock, root: Path, folder: Path) -> str:
    """The `[clock]` table of a config in `folder`: started by `site up` (its anchor file)."""
    if clock.real_time:
        return "[clock]\n# real time\n\n"
    anchor = os.path.relpath(root / "run" / "clock-anchor", folder)
    return toml_table("clock", {"start": clock.start, "speed": clock.speed, "anchor_file": anchor})


def lab_timing(speed: float) -> Timing:
    """Market timers for a clock `speed` times real time (real-time defaults at 1)."""
    if speed == 1.0:
        return Timing()
    wall = speed  # market seconds per real second
    return Timing(
        bid_lead_s=float(round(max(300.0, 1.6 * wall))),
        delta_s=0.1,
        block_interval_s=float(round(max(60.0, 0.8 * wall))),
        vote_timeout_s=0.7,
        settle_grace_s=int(max(300, 0.8 * wall)),
        sample_interval_s=900,
    )


def microgrid_days(n: int) -> tuple[MicrogridDay, ...]:
    from meterchain.market.reference import reference_microgrids, synthetic_case

    if n == 4:
        return reference_microgrids()
    return synthetic_case(n).microgrids


def meter_plans(days: Iterable[MicrogridDay]) -> list[MeterPlan]:
    """Three meters per microgrid: renewable plant, load, and the point of common coupling.

    The lab's grid absorbs every difference: the coupling point shows load
    minus renewable output (storage and turbine setpoints are not simulated).
    """
    plans = []
    for mg in days:
        short = mg.id.split("-", 1)[0]
        green = "wind" if "wind" in mg.id or "hospital" in mg.id else "pv"
        plans.append(MeterPlan(f"{short}-{green}", mg.id, green, tuple(-w for w in mg.renewable_w)))
        plans.append(MeterPlan(f"{short}-load", mg.id, "load", mg.load_w))
        plans.append(
            MeterPlan(
                f"{short}-pcc", mg.id, "bidir",
                tuple(ld - r for ld, r in zip(mg.load_w, mg.renewable_w, strict=True)),
            )
        )  # fmt: skip
    return plans


def _broker_address(opts: InitOptions, port: int) -> tuple[str, str, str]:
    """(url the services use, external username, external password)."""
    if not opts.broker:
        return f"mqtts://{opts.host}:{port}", "", ""
    parts = urlsplit(opts.broker)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise SiteError(f"--broker {opts.broker!r}: expected mqtt(s)://[user:password@]host[:port]")
    try:
        port_part = f":{parts.port}" if parts.port else ""
    except ValueError as exc:
        raise SiteError(f"--broker {opts.broker!r}: {exc}") from exc
    if parts.scheme == "mqtts" and opts.ca_file is None:
        raise SiteError("--broker mqtts://...: give the broker's CA with --ca")
    url = f"{parts.scheme}://{parts.hostname}{port_part}"
    return url, unquote(parts.username or ""), unquote(parts.password or "")


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def init_site(root: Path, opts: InitOptions) -> Site:
    """Write a new site into `root` (which must be empty or absent); returns it."""
    root = Path(root).resolve()
    if root.exists() and any(root.iterdir()):
        raise SiteError(f"{root} is not empty: a site is written into a new folder")
    if not 2 <= opts.microgrids <= 200:
        raise SiteError(f"--microgrids must be 2..200, got {opts.microgrids}")
    if not 1 <= opts.members <= opts.microgrids:
        raise SiteError(f"--members must be 1..{opts.microgrids}, got {opts.members}")
    if not 0 < opts.speed <= 100_000:
        raise SiteError(f"--speed must be in (0, 100000], got {opts.speed}")
    check_name("market", opts.market)
    root.mkdir(parents=True, exist_ok=True)
    (root / "secrets").mkdir(mode=0o700)
    port = opts.port or (free_port(opts.host) if not opts.broker else 0)
    url, ext_user, ext_password = _broker_address(opts, port)
    timing = lab_timing(opts.speed)
    days = microgrid_days(opts.microgrids)
    ids = [mg.id for mg in days]
    members, submitters = ids[: opts.members], ids[opts.members :]
    clock = MarketClock()
    if opts.speed != 1.0:
        # The day starts with the bids for 00:00 (a submitter bids 2 delta ahead of the nodes).
        lead = timing.bid_lead_s + 2 * timing.delta_s * opts.speed + 300
        anchor = root / "run" / "clock-anchor"
        clock = MarketClock(DAY_START - int(lead), opts.speed, anchor_file=anchor)
    site_toml = (
        "# Written by `meterchain site init`; `meterchain site up` starts what it describes.\n"
        + toml_table(
            "site",
            {
                "market": opts.market, "members": members, "submitters": submitters,
                "emulated": opts.emulated, "broker_url": url, "broker_username": ext_user,
                "run_broker": not opts.broker,
            },
        )
        + toml_table("timing", {k: getattr(timing, k) for k in Timing.__dataclass_fields__})
        + clock_table(clock, root, root)
    )  # fmt: skip
    _public(root / SITE_FILE, site_toml)
    from meterchain.site.layout import load

    site = load(root)

    # --- identities -------------------------------------------------------------------
    regulator = PrivateKey.generate()
    regulator.save(site.secret("regulator.key"))
    node_keys = {}
    for node_id in ids:
        key = PrivateKey.generate()
        key.save(site.secret(f"{node_id}.key"))
        node_keys[node_id] = key
    membership = Membership(
        opts.market, 1, tuple(Member(n, node_keys[n].public_key()) for n in members)
    ).signed_by(regulator)
    _public(root / "membership.toml", membership.to_toml())
    _public(
        root / "participants.toml",
        "# Submit-only microgrids whose signed bids the consensus members accept.\n"
        + "".join(
            toml_table("participant",
                       {"id": s, "public_key": node_keys[s].public_key().point.hex()}, array=True)
            for s in submitters
        ),
    )  # fmt: skip

    # --- broker users -------------------------------------------------------------------
    plans = meter_plans(days)
    passwords: dict[str, str] = {}
    for user in (AGGREGATOR_ID, REGULATOR_ID, *ids, *(p.id for p in plans)):
        passwords[user] = ext_password or secrets.token_urlsafe(18)
        if user not in {p.id for p in plans}:
            _private(site.secret(f"{user}.pass"), passwords[user] + "\n")
    ca = None
    if opts.broker:
        if opts.ca_file is not None:
            (root / "ca").mkdir()
            shutil.copyfile(opts.ca_file, root / "ca" / "ca.crt")
            ca = root / "ca" / "ca.crt"
    else:
        ca = _write_broker(site, opts, port, passwords, ids, [p.id for p in plans])

    # --- meters: registry and the boards that hold their keys --------------------------
    meter_keys: dict[str, str] = {}
    if opts.emulated:
        meter_keys = _provision_boards(site, plans, url, ca, ext_user, passwords)
    registry = "".join(
        entry_text(make_meter(p.id, meter_keys[p.id], p.owner, p.source)) + "\n"
        for p in plans
        if p.id in meter_keys
    )
    _public(root / "registry.toml", "# Meters of the site (meterchain.registry).\n" + registry)
    t0 = clock.start or DAY_START
    genesis = [
        signed(opts.market, "participant",
               {"id": mg, "role": "microgrid", "key": node_keys[mg].public_key().point,
                "time": t0}, regulator)
        for mg in ids
    ] + [
        signed(opts.market, "meter",
               {"id": p.id, "owner": p.owner, "key": bytes.fromhex(meter_keys[p.id]),
                "source": p.source, "time": t0}, regulator)
        for p in plans
        if p.id in meter_keys
    ]  # fmt: skip
    from meterchain.market.network import reference_network

    feeder = reference_network()
    if {mg for mg, _ in feeder.sites} == set(ids):  # the reference day sits on its feeder (M25)
        terms = {"network": feeder.to_cbor(), "time": t0}
        genesis.append(signed(opts.market, "grid_network", terms, regulator))
    (root / "genesis.cbor").write_bytes(codec.encode([tx.raw for tx in genesis]))

    # --- service configurations --------------------------------------------------------
    for mg in days:
        _write_agent(site, mg, membership, regulator, ca, ext_user)
    _write_aggregator(site, regulator, ca, ext_user)
    _write_units(site)
    (root / "state").mkdir(exist_ok=True)
    return site


def _acl(market: str, ids: list[str], meters: list[str]) -> str:
    """Per-client ACL blocks (meterchain.mqtt_auth): who may publish where."""
    out = [f"# MeterChain ACL for market {market!r}, written by `meterchain site init`.\n"]
    for operator in (AGGREGATOR_ID, REGULATOR_ID):
        # Proposals and blocks, or signed records, under its own id; never a meter's ack.
        out.append(f"user {operator}\ntopic write mc/{market}/c/{operator}/#\n"
                   f"topic read mc/{market}/#\n\n")  # fmt: skip
    for node in ids:
        # One broker user per connection (use_username_as_clientid): ingest, SDBFT, review.
        users = (node, f"{node}.sdbft", f"{node}.review")
        out += [node_acl(market, node, user=user) + "\n" for user in users]
    out += [meter_acl(market, meter) + "\n" for meter in meters]
    return "".join(out)


def _write_broker(
    site: Site,
    opts: InitOptions,
    port: int,
    passwords: dict[str, str],
    ids: list[str],
    meters: list[str],
) -> Path:
    """CA, server certificate, mosquitto.conf, passwd and ACL; returns the CA certificate."""
    from meterchain.site.pki import make_pki

    broker = site.root / "broker"
    broker.mkdir()
    ca_cert = make_pki(site.root / "ca", broker, opts.host)
    lines = []
    for user, password in passwords.items():
        lines.append(password_line(user, password))
        if user in ids:
            lines.append(password_line(f"{user}.sdbft", password))
            lines.append(password_line(f"{user}.review", password))
    _private(broker / "passwd", "\n".join(lines) + "\n")
    _private(broker / "acl", _acl(opts.market, ids, meters))
    (broker / "persistence").mkdir()
    run_as = getpass.getuser()
    conf = [
        "# Mosquitto for this site, written by `meterchain site init` (see deploy/mosquitto).",
        "per_listener_settings false",
        # The broker runs as the user that owns passwd and acl (0600): no one else reads them.
        f"user {run_as}",
        "allow_anonymous false",
        f"password_file {broker / 'passwd'}",
        f"acl_file {broker / 'acl'}",
        "persistence true",
        f"persistence_location {broker / 'persistence'}/",
        "autosave_interval 5",
        "max_inflight_messages 100",
        "max_queued_messages 100000",
        "set_tcp_nodelay true",
        "log_type error",
        "log_type warning",
        "log_type notice",
        f"log_dest file {broker / 'mosquitto.log'}",
        f"listener {port} {opts.host}",
        f"cafile {ca_cert}",
        f"certfile {broker / 'server.crt'}",
        f"keyfile {broker / 'server.key'}",
        "tls_version tlsv1.2",
        # A listener option: before the `listener` line Mosquitto ignores it.
        "use_username_as_clientid true",
    ]
    _public(broker / "mosquitto.conf", "\n".join(conf) + "\n")
    return ca_cert


def _provision_boards(
    site: Site,
    plans: list[MeterPlan],
    url: str,
    ca: Path | None,
    ext_user: str,
    passwords: dict[str, str],
) -> dict[str, str]:
    """One emulated board per meter (config, secrets, CA; it makes its own key); lab.toml."""
    from meterchain.board.emulated import ensure_firmware_importable
    from meterchain.board.provision import validate_config

    ensure_firmware_importable()
    from mc import keystore
    from mc.flash import Flash

    parts = urlsplit(url)
    tls = parts.scheme == "mqtts"
    keys = {}
    lab = site.root / "lab"
    meters_toml = []
    for k, plan in enumerate(plans):
        folder = lab / "boards" / plan.id
        folder.mkdir(parents=True)
        flat = {
            "meter_id": plan.id, "market": site.market, "source": plan.source, "wdt_s": 0,
            "console_readings": False, "interval_s": max(1, int(site.timing.sample_interval_s)),
            "meter.type": "sdm630", "meter.baud": 19200, "meter.unit": 1,
            "meter.timeout_ms": 500, "broker.host": parts.hostname or "localhost",
            "broker.port": parts.port or (8883 if tls else 1883), "broker.tls": tls,
            "broker.username": ext_user or plan.id, "broker.keepalive_s": 60,
            "broker.backoff_min_ms": 50, "broker.backoff_max_ms": 1000,
            "spool.batch": 1, "spool.flush_s": 1,
        }  # fmt: skip
        validate_config(flat)
        config: dict[str, dict[str, object] | object] = {}
        for key, value in flat.items():
            section, dot, sub = key.partition(".")
            if dot:
                config.setdefault(section, {})[sub] = value  # type: ignore[union-attr]
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        _private(folder / "secrets.json", json.dumps({"broker": {"password": passwords[plan.id]}}))
        if ca is not None:
            shutil.copyfile(ca, folder / "ca.pem")
        # The key is generated on the board (its random source, its flash) at first boot.
        secret = keystore.ensure(Flash(str(folder)), os.urandom)
        keys[plan.id] = keystore.public_hex(secret)
        meters_toml.append(
            toml_table(
                "meter",
                {"id": plan.id, "board": f"boards/{plan.id}", "power_w": list(plan.power_w),
                 "seed": k + 1},
                array=True,
            )
        )  # fmt: skip
    interval_ms = max(50, int(site.timing.sample_interval_s * 1000 / site.clock.speed))
    _public(
        lab / "lab.toml",
        "# The emulated meters and boards of this site (python -m hil.lab lab.toml).\n"
        + toml_table("lab", {"status": "status.json", "interval_ms": interval_ms})
        + "".join(meters_toml)
        + clock_table(site.clock, site.root, lab),
    )
    return keys


def _profile(mg: MicrogridDay) -> str:
    return (
        "# The microgrid's typical day (edge_agent.forecast profile file).\n"
        + f"renewable_w = {_toml_value(list(mg.renewable_w))}\n"
        + f"load_w = {_toml_value(list(mg.load_w))}\n"
    )


def _green_share_pct(mg: MicrogridDay) -> int:
    return round(100 * sum(mg.green_demand_w) / max(1, sum(mg.load_w)))


def _write_agent(
    site: Site,
    mg: MicrogridDay,
    membership: Membership,
    regulator: PrivateKey,
    ca: Path | None,
    ext_user: str,
) -> None:
    from meterchain.market.reference import reference_market

    folder = site.root / "agents" / mg.id
    folder.mkdir(parents=True)
    _public(folder / "profile.toml", _profile(mg))
    market = reference_market()
    role = "node" if mg.id in site.site.members else "submitter"
    rel = os.path.relpath
    broker: dict[str, object] = {
        "url": site.site.broker_url,
        "ca_file": rel(ca, folder) if ca is not None else None,
        "username": ext_user or mg.id,
        "password_file": rel(site.secret(f"{mg.id}.pass"), folder),
        # A lab site's agents have a few meters each and share one machine: ingest in
        # the agent process, not one worker process per core per agent.
        "ingest_workers": 0,
    }
    if not ext_user:
        broker["consensus_username"] = f"{mg.id}.sdbft"
        broker["review_username"] = f"{mg.id}.review"
    consensus: dict[str, object] = {
        "role": role,
        "membership": rel(site.root / "membership.toml", folder),
        "bid_lead_s": site.timing.bid_lead_s,
        "delta_s": site.timing.delta_s,
        "regulator_public_key": regulator.public_key().point.hex(),
    }
    if role == "node":
        consensus["participants"] = rel(site.root / "participants.toml", folder)
        consensus["aggregator"] = AGGREGATOR_ID
    microgrid: dict[str, object] = {
        "retail_price_per_kwh": list(mg.retail_price_per_kwh),
        "feed_in_tariff_per_kwh": mg.feed_in_tariff_per_kwh,
        "green_loss_per_kwh": mg.green_loss.segments[0][1],
        "green_share_pct": _green_share_pct(mg),
        "grid_import_limit_w": mg.grid_import_limit_w or 0,
        "deposit": mg.deposit,
    }
    text = (
        f"# Edge agent of {mg.id}, written by `meterchain site init` (edge_agent.config).\n"
        + toml_table(
            "agent",
            {"node_id": mg.id, "market": site.market,
             "key_file": rel(site.secret(f"{mg.id}.key"), folder),
             "registry": rel(site.root / "registry.toml", folder),
             "state_dir": rel(site.root / "state" / "agents" / mg.id, folder)},
        )
        + toml_table("broker", broker)
        + toml_table("forecast", {"kind": "profile", "profile_file": "profile.toml"})
        + toml_table("market", {"wheeling_fee_per_kwh": market.wheeling_fee_per_kwh,
                                "flow_wear_per_mw2h": market.flow_wear_per_mw2h,
                                "min_deposit": market.min_deposit})
        + toml_table("microgrid", microgrid)
    )  # fmt: skip
    if mg.gas is not None:
        g = mg.gas
        text += toml_table(
            "microgrid.gas",
            {"a_per_mw2h": g.a_per_mw2h, "b_per_kwh": g.b_per_kwh, "p_max_w": g.p_max_w,
             "p_min_w": g.p_min_w},
        )  # fmt: skip
    if mg.storage is not None:
        s = mg.storage
        text += toml_table(
            "microgrid.storage",
            {"charge_max_w": s.charge_max_w, "discharge_max_w": s.discharge_max_w,
             "efficiency_ppm": s.efficiency_ppm, "e_min_wh": s.e_min_wh, "e_max_wh": s.e_max_wh,
             "soc_wh": s.soc_wh},
        )  # fmt: skip
    text += toml_table("consensus", consensus) + clock_table(site.clock, site.root, folder)
    _public(folder / "agent.toml", text)


def _write_aggregator(site: Site, regulator: PrivateKey, ca: Path | None, ext_user: str) -> None:
    folder = site.root / "aggregator"
    folder.mkdir()
    rel = os.path.relpath
    t = site.timing
    text = (
        "# The market aggregator, written by `meterchain site init` (aggregator.config).\n"
        + toml_table(
            "aggregator",
            {"market": site.market, "node_id": AGGREGATOR_ID,
             "ledger": rel(site.ledger, folder),
             "membership": rel(site.root / "membership.toml", folder),
             "regulator_key": regulator.public_key().point.hex(),
             "genesis_txs": rel(site.root / "genesis.cbor", folder),
             "block_interval_s": t.block_interval_s, "vote_timeout_s": t.vote_timeout_s,
             "settle_grace_s": t.settle_grace_s},
        )
        + toml_table(
            "broker",
            {"url": site.site.broker_url,
             "ca_file": rel(ca, folder) if ca is not None else None,
             "username": ext_user or AGGREGATOR_ID,
             "password_file": rel(site.secret(f"{AGGREGATOR_ID}.pass"), folder)},
        )
        + clock_table(site.clock, site.root, folder)
    )  # fmt: skip
    _public(folder / "aggregator.toml", text)
    site.ledger.parent.mkdir(parents=True, exist_ok=True)


def _write_units(site: Site) -> None:
    """systemd units for this site's paths (the installed command, see the README)."""
    from meterchain.site.units import agent_unit, aggregator_unit

    folder = site.root / "systemd"
    folder.mkdir()
    _public(folder / "meterchain-aggregator.service", aggregator_unit(site))
    for mg in site.microgrids:
        _public(folder / f"meterchain-agent-{mg}.service", agent_unit(site, mg))
