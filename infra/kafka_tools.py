"""`aigc kafka groups | share-groups | topics | configs | offsets`: Kafka's own admin tools, run from the
jars in ``infra/lib/kafka`` (kafka-tools) against the configured bootstrap servers.

Each verb runs the tool's main class with ``--bootstrap-server`` from AIGC_KAFKA__BOOTSTRAP_SERVERS
(unless the arguments give one) and every other argument passed through unchanged, so Kafka's own
documentation for the tool applies. A cluster with security settings gets them as ``--command-config``.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from plumbing.settings import Settings

TOOLS = {
    "groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "share-groups": "org.apache.kafka.tools.consumer.group.ShareGroupCommand",
    "topics": "org.apache.kafka.tools.TopicCommand",
    "configs": "kafka.admin.ConfigCommand",
    "offsets": "org.apache.kafka.tools.GetOffsetShell",
}
HEAP = "-Xmx256m"
# Tools log their own chatter at INFO through log4j2 unless told otherwise; warnings are enough.
LOG4J = "-Dlog4j2.rootLogger.level=WARN"


def tool_command(
    settings: Settings, tool: str, args: list[str], command_config: Path | None = None
) -> list[str]:
    """The java command line that runs ``tool`` with ``args`` against the configured cluster."""
    lib = settings.infra.lib_dir.resolve() / "kafka"
    if not any(lib.glob("kafka-tools-*.jar")):
        raise FileNotFoundError(f"no kafka-tools jar in {lib}: run `make setup` first")
    command = ["java", HEAP, LOG4J, "-cp", f"{lib}/*", TOOLS[tool]]
    if "--bootstrap-server" not in args:
        command += ["--bootstrap-server", settings.kafka.bootstrap_servers]
    if command_config is not None and "--command-config" not in args:
        command += ["--command-config", str(command_config)]
    return command + args


def run_tool(settings: Settings, tool: str, args: list[str]) -> int:
    """Run Kafka's ``tool`` in the foreground (its output is the user's); returns its exit status."""
    client = settings.kafka.client_config()
    if client["security.protocol"] == "PLAINTEXT":
        return subprocess.run(tool_command(settings, tool, args), check=False).returncode
    with tempfile.NamedTemporaryFile("w", suffix=".properties") as props:
        props.write("".join(f"{k}={v}\n" for k, v in client.items() if k != "bootstrap.servers"))
        props.flush()
        return subprocess.run(tool_command(settings, tool, args, Path(props.name)), check=False).returncode
