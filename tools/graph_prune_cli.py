"""`graph-prune SUBCOMMAND [flags]`: the tools as one console command, for a pip
install (pyproject.toml). Each subcommand is the tool of the same name in tools/,
with the same flags and exit codes as its Bazel target:

  graph-prune prune --in=model.pb --out=pruned.pb --ratio=0.5
  graph-prune bench | evaluate | sweep | profile-widths ...
"""

import importlib
import sys

COMMANDS = {"prune": "tools.prune", "bench": "tools.bench", "evaluate": "tools.evaluate",
            "sweep": "tools.sweep", "profile-widths": "tools.profile_widths"}


def _usage() -> str:
  return ("usage: graph-prune {" + ",".join(COMMANDS) + "} [flags]\n"
          "  graph-prune SUBCOMMAND --help lists a subcommand's flags")


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    return 0 if len(argv) >= 2 else 2
  command = argv[1]
  if command not in COMMANDS:
    print(f"graph-prune: error: unknown subcommand '{command}'\n{_usage()}", file=sys.stderr)
    return 2
  # Only the chosen tool is imported: each defines its own flags.
  tool = importlib.import_module(COMMANDS[command])
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(tool.main, argv=[f"graph-prune {command}"] + argv[2:])
  return 0   # app.run exits with the tool's status; not reached


if __name__ == "__main__":
  sys.exit(main())
