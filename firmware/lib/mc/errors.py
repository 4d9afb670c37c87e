"""The firmware's configuration error, in a module of its own.

Kept apart from mc.config so the app can drop the config module (its schema and
code) from RAM once the settings are validated, while this small class lives on.
"""


class ConfigError(Exception):
    """A missing or invalid setting; `key` names it ("section.key"), `file` says where."""

    def __init__(self, file: str, key, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        super().__init__("%s: %s: %s" % (file, key, problem) if key else "%s: %s" % (file, problem))
