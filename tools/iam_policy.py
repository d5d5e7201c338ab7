"""The S3 part of a Terraform IAM policy document as the JSON policy AWS would receive.

    python -m tools.iam_policy ray_data --bucket mint-ray-111122223333-us-west-2

``infra/terraform`` builds its policies with ``data "aws_iam_policy_document"``; this
module evaluates such a document the way ``terraform plan`` would for the pieces it
uses (string templates, ``var.*`` defaults, ``local.*``, ``for`` lists, ``flatten``,
``concat``, the bucket's ARN and name) and keeps the statements whose actions are all
``s3:*`` (KMS, EC2 and Secrets Manager have no stand-in on a local S3 server). The
rehearsal (``tests/test_rehearsal.py``) gives the result to the jobs' S3 user on the
local Ceph gateway, so a permission the code needs and the role lacks fails there.
An expression outside that subset is an error naming it, never a silent guess.

``rgw_compatible`` adds the one statement Ceph's gateway (16.x) needs beyond AWS: its
multi-object delete checks ``s3:DeleteObject`` on the bucket before it checks every key
against the policy (AWS checks the keys only). The per-key checks still apply, so the
statement widens nothing on the gateway.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from tools.validate_manifests import TERRAFORM, load_terraform


class TranslateError(ValueError):
    """An expression the translator does not evaluate."""


# ---------------------------------------------------------------- expressions

_TOKEN = re.compile(r"\s*(?:(?P<str>\")|(?P<num>\d+)|(?P<name>[A-Za-z_][\w-]*)|(?P<punct>[\[\](),:.]))")


class _Expr:
    """A recursive-descent evaluator for the HCL subset the policies use."""

    def __init__(self, text: str, scope: _Scope, bound: dict[str, Any]) -> None:
        self.text, self.pos, self.scope, self.bound = text, 0, scope, bound

    def fail(self, what: str) -> TranslateError:
        return TranslateError(f"{what} at {self.pos} in {self.text!r}")

    def peek(self) -> tuple[str, str] | None:
        m = _TOKEN.match(self.text, self.pos)
        if not m or m.end() == self.pos:
            return None
        kind = m.lastgroup or ""
        return kind, m.group(kind)

    def take(self, expected: str | None = None) -> tuple[str, str]:
        m = _TOKEN.match(self.text, self.pos)
        if not m:
            raise self.fail("unexpected text")
        kind = m.lastgroup or ""
        if expected is not None and m.group(kind) != expected:
            raise self.fail(f"expected {expected!r}")
        self.pos = m.end()
        return kind, m.group(kind)

    def parse(self) -> Any:
        value = self.value()
        if self.text[self.pos:].strip():
            raise self.fail("unsupported expression")
        return value

    def value(self) -> Any:
        kind, tok = self.take()
        if kind == "str":
            return self.string()
        if kind == "num":
            return int(tok)
        if tok == "[":
            return self.list_or_for()
        if kind == "name":
            nxt = self.peek()
            if nxt and nxt[1] == "(":
                return self.call(tok)
            return self.traversal(tok)
        raise self.fail(f"unexpected {tok!r}")

    def string(self) -> str:
        out, i = [], self.pos
        while i < len(self.text):
            ch = self.text[i]
            if ch == "\\":
                out.append(self.text[i + 1])
                i += 2
            elif ch == '"':
                self.pos = i + 1
                return "".join(out)
            elif self.text.startswith("${", i):
                inner = _Expr(self.text, self.scope, self.bound)
                inner.pos = i + 2
                out.append(str(inner.value()))
                j = inner.pos
                while j < len(self.text) and self.text[j].isspace():
                    j += 1
                if j >= len(self.text) or self.text[j] != "}":
                    raise inner.fail("expected '}'")
                i = j + 1
            else:
                out.append(ch)
                i += 1
        raise self.fail("unterminated string")

    def list_or_for(self) -> list[Any]:
        nxt = self.peek()
        if nxt and nxt[1] == "for":
            self.take("for")
            _, var = self.take()
            self.take("in")
            items = self.value()
            self.take(":")
            start = self.pos
            out = []
            for item in items:
                body = _Expr(self.text, self.scope, {**self.bound, var: item})
                body.pos = start
                out.append(body.value())
                self.pos = body.pos
            if not items:  # still parse the body to find the closing bracket
                _Expr(self.text, self.scope, {**self.bound, var: ""}).value()
            self.take("]")
            return out
        items = []
        while True:
            nxt = self.peek()
            if nxt and nxt[1] == "]":
                self.take("]")
                return items
            items.append(self.value())
            nxt = self.peek()
            if nxt and nxt[1] == ",":
                self.take(",")

    def call(self, name: str) -> Any:
        self.take("(")
        args = []
        while True:
            nxt = self.peek()
            if nxt and nxt[1] == ")":
                self.take(")")
                break
            args.append(self.value())
            nxt = self.peek()
            if nxt and nxt[1] == ",":
                self.take(",")
        if name == "concat":
            return [x for a in args for x in a]
        if name == "flatten":
            def flat(v: Any) -> list[Any]:
                return [y for x in v for y in flat(x)] if isinstance(v, list) else [v]
            return flat(args[0])
        raise self.fail(f"function {name}() is not supported")

    def traversal(self, head: str) -> Any:
        parts = [head]
        while True:
            nxt = self.peek()
            if not nxt or nxt[1] != ".":
                break
            self.take(".")
            parts.append(self.take()[1])
        if len(parts) == 1:
            if head in self.bound:
                return self.bound[head]
            raise self.fail(f"unknown name {head!r}")
        return self.scope.reference(parts)


class _Scope:
    def __init__(self, tf: dict[str, Any], bucket: str, variables: dict[str, Any]) -> None:
        self.tf, self.bucket, self.variables = tf, bucket, variables

    def evaluate(self, value: Any, bound: dict[str, Any] | None = None) -> Any:
        if isinstance(value, list):
            return [self.evaluate(v, bound) for v in value]
        if not isinstance(value, str):
            return value
        m = re.fullmatch(r"\$\{(.*)\}", value, re.S)
        if m and _balanced(m.group(1)):
            return _Expr(m.group(1), self, bound or {}).parse()
        return _Expr(json.dumps(value), self, bound or {}).parse() if "${" in value else value

    def reference(self, parts: list[str]) -> Any:
        kind = parts[0]
        if kind == "var":
            name = parts[1]
            if name in self.variables:
                return self.variables[name]
            decl = self.tf["variable"].get(name)
            if decl is None or "default" not in decl:
                raise TranslateError(f"var.{name}: not declared or without a default (pass it)")
            return decl["default"]
        if kind == "local":
            if parts[1] not in self.tf["locals"]:
                raise TranslateError(f"local.{parts[1]} is not defined")
            return self.evaluate(self.tf["locals"][parts[1]])
        if kind == "aws_s3_bucket" and len(parts) == 3:
            if parts[2] == "arn":
                return f"arn:aws:s3:::{self.bucket}"
            if parts[2] in ("id", "bucket"):
                return self.bucket
        raise TranslateError(f"{'.'.join(parts)}: no value outside AWS (only the bucket's arn/id are known)")


def _balanced(text: str) -> bool:
    """Whether ``${...}`` wraps the whole string (not "${a}-${b}")."""
    depth = 0
    in_str = False
    i = 0
    while i < len(text):
        ch = text[i]
        if in_str:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return False
        i += 1
    return depth == 0


# ---------------------------------------------------------------- documents


def _blocks(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return [value] if isinstance(value, dict) else []


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def s3_policy(tf: dict[str, Any], document: str, bucket: str,
              variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """The S3 statements of ``data.aws_iam_policy_document.<document>`` as IAM JSON."""
    docs = tf["data"].get("aws_iam_policy_document", {})
    if document not in docs:
        raise TranslateError(f"no data.aws_iam_policy_document.{document}; known: {', '.join(sorted(docs))}")
    scope = _Scope(tf, bucket, variables or {})
    statements = []
    for i, st in enumerate(_blocks(docs[document].get("statement"))):
        actions = [str(a) for a in _as_list(scope.evaluate(st.get("actions", [])))]
        if not actions or not all(a.startswith("s3:") for a in actions):
            continue
        out: dict[str, Any] = {"Sid": st.get("sid") or f"Statement{i}", "Effect": st.get("effect", "Allow"),
                               "Action": actions,
                               "Resource": [str(r) for r in _as_list(scope.evaluate(st.get("resources", [])))]}
        for cond in _blocks(st.get("condition")):
            values = [str(v) for v in _as_list(scope.evaluate(cond["values"]))]
            out.setdefault("Condition", {}).setdefault(cond["test"], {})[cond["variable"]] = values
        statements.append(out)
    return {"Version": "2012-10-17", "Statement": statements}


def policy_from_terraform(document: str, bucket: str, tf_dir: Path = TERRAFORM,
                          variables: dict[str, Any] | None = None) -> dict[str, Any]:
    return s3_policy(load_terraform(tf_dir), document, bucket, variables)


def rgw_compatible(policy: dict[str, Any]) -> dict[str, Any]:
    """``policy`` plus the bucket-level ``s3:DeleteObject`` that Ceph's multi-object delete
    checks first (see the module doc); nothing is added when no key may be deleted."""
    buckets = sorted({r.split("/", 1)[0] for st in policy["Statement"] if st["Effect"] == "Allow"
                      and "s3:DeleteObject" in st["Action"] for r in st["Resource"] if "/" in r})
    if not buckets:
        return policy
    extra = {"Sid": "RgwMultiDeleteEntry", "Effect": "Allow", "Action": ["s3:DeleteObject"], "Resource": buckets}
    return {**policy, "Statement": [*policy["Statement"], extra]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("document", help="name of the aws_iam_policy_document (e.g. ray_data, mlflow)")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--tf-dir", type=Path, default=TERRAFORM)
    parser.add_argument("--rgw", action="store_true", help="add the Ceph RGW multi-delete statement")
    args = parser.parse_args(argv)
    policy = policy_from_terraform(args.document, args.bucket, args.tf_dir)
    print(json.dumps(rgw_compatible(policy) if args.rgw else policy, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
