"""The README's table of Istio's options is interceptor/pod/istio.py's table, rendered
(no root, no kernel); `UPDATE_GOLDEN=1 make unit` rewrites the README's copy."""
import os
import pathlib
import re

from interceptor.pod import istio, podspec

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- istio-options: generated from interceptor/pod/istio.py -->", "<!-- /istio-options -->"


def _setting(option):
    if option.setting is None:
        return "(none)"
    field = podspec.BY_NAME[option.setting]
    where = [f"`{field.flag}`", f"`{field.config_key}`"]
    if field.annotation:
        where.append(f"`{field.annotation}`")
    return " ".join(where)


def render():
    lines = ["| istio-iptables | Istio takes it from | setting here (flag, CNI key, annotation) | modes | notes |",
             "|---|---|---|---|---|"]
    for o in istio.OPTIONS:
        lines.append(f"| `{o.flag}` {o.config} | {o.istio_source} | {_setting(o)} | "
                     f"{o.coverage or 'n/a'} | {o.note} |")
    return "\n".join(lines)


def test_the_readme_table_is_the_options_table():
    text = README.read_text()
    block = f"{BEGIN}\n{render()}\n{END}"
    if os.environ.get("UPDATE_GOLDEN"):
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        README.write_text(text)
    assert block in text, "the README's table of Istio options is stale (UPDATE_GOLDEN=1 make unit)"


def test_every_option_names_a_real_setting():
    for o in istio.OPTIONS:
        assert o.setting is None or o.setting in podspec.BY_NAME, o.config
    # every Istio annotation a setting takes is in the table
    istio_annotations = {f.annotation for f in podspec.FIELDS
                         if f.annotation and "istio.io" in f.annotation}
    assert istio_annotations <= {o.istio_source for o in istio.OPTIONS}
