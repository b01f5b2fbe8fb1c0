"""Print the README's configuration reference table from the config dataclasses (the one source
of key names, defaults and help): python scripts/config_reference.py"""

from lowrank_train.config import field_docs


def main() -> None:
    for key, default, help_text in field_docs():
        shown = ", ".join(map(str, default)) if isinstance(default, list) else default
        print(f"| `{key}` | `{shown}` | {help_text.replace('|', '/')} |")


if __name__ == "__main__":
    main()
