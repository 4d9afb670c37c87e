"""systemd units for one site's services, pointing at the documented install and the site's files.

The units run the `meterchain` of the install the README creates
(`/opt/meterchain`, a virtual environment; `INSTALL` below) as the user that
owns the site folder, which holds the configurations and (in `secrets/`,
0600) the keys; the services may write only the site's `state/`.
`deploy/systemd/` has the generic units for a site laid out under /etc.
"""

from __future__ import annotations

import getpass

from meterchain.site.layout import Site

INSTALL = "/opt/meterchain/bin/meterchain"

_HARDENING = """\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
CapabilityBoundingSet=
UMask=0077
"""


def _unit(
    site: Site, description: str, command: str, config: str, after: str, *, reload: bool = False
) -> str:
    # The agent reads its registry again on SIGHUP (`systemctl reload`).
    reload_line = "ExecReload=/bin/kill -HUP $MAINPID\n" if reload else ""
    return f"""\
# {description}, written by `meterchain site init` for the site in {site.root}.
# Install: sudo cp {site.root}/systemd/*.service /etc/systemd/system/
#          sudo systemctl daemon-reload

[Unit]
Description={description}
Wants=network-online.target
After=network-online.target time-sync.target {after}

[Service]
Type=notify
NotifyAccess=main
User={getpass.getuser()}
WorkingDirectory={site.root}
ExecStartPre={INSTALL} {command} check-config --config {config}
ExecStart={INSTALL} {command} run --config {config}
{reload_line}WatchdogSec=60
Restart=on-failure
RestartSec=5
RestartPreventExitStatus=2
KillSignal=SIGTERM
TimeoutStopSec=60
ReadWritePaths={site.root / "state"}
{_HARDENING}
[Install]
WantedBy=multi-user.target
"""


def aggregator_unit(site: Site) -> str:
    return _unit(
        site, f"MeterChain aggregator of market {site.market}", "aggregator",
        str(site.aggregator_config), "mosquitto.service",
    )  # fmt: skip


def agent_unit(site: Site, node_id: str) -> str:
    return _unit(
        site, f"MeterChain edge agent {node_id} of market {site.market}", "agent",
        str(site.agent_config(node_id)), "mosquitto.service", reload=True,
    )  # fmt: skip
