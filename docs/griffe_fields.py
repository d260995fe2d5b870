"""Griffe extension: a config dataclass field's ``help`` metadata becomes its docstring.

The config dataclasses keep each option's help in ``field(metadata=help_text("..."))``, where
``--help`` reads it; this gives the API reference the same sentence, and shows the field's
default instead of the ``field(...)`` call that holds it.
"""

from __future__ import annotations

import ast
import html
from typing import Any

from griffe import Attribute, Docstring, Extension


class FieldHelp(Extension):
    def on_attribute_instance(self, *, node: Any, attr: Attribute, **kwargs: Any) -> None:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Call)):
            return
        call = node.value
        if ast.unparse(call.func) not in ("field", "dataclasses.field"):
            return
        keywords = {keyword.arg: keyword.value for keyword in call.keywords}
        if "default" in keywords:
            attr.value = ast.unparse(keywords["default"])
        elif "default_factory" in keywords:
            attr.value = f"{ast.unparse(keywords['default_factory'])}()"
        metadata = keywords.get("metadata")
        if attr.docstring is None and isinstance(metadata, ast.Call) and metadata.args:
            try:
                text = ast.literal_eval(metadata.args[0])
            except ValueError:  # an f-string: its values are only known at run time
                return
            # Markdown would take "<data>" for an HTML tag; the help shows it as written.
            attr.docstring = Docstring(html.escape(text, quote=False), parent=attr)
