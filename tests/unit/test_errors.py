import json

import pytest

from guard.errors import REASONS, Refusal, render

MLFLOW_ERROR_CODES = {
    "BAD_REQUEST", "UNAUTHENTICATED", "PERMISSION_DENIED", "ENDPOINT_NOT_FOUND",
    "RESOURCE_EXHAUSTED", "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED",
    "INVALID_PARAMETER_VALUE",
}  # fmt: skip


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_every_reason_maps_to_a_status_and_an_mlflow_code(reason: str) -> None:
    info = REASONS[reason]
    assert 400 <= info.status < 600
    assert info.error_code in MLFLOW_ERROR_CODES
    assert info.message.endswith(".")
    # 401 means "who are you", 403 "you may not": never mixed.
    if info.status == 401:
        assert info.error_code == "UNAUTHENTICATED"
    if info.status == 403:
        assert info.error_code == "PERMISSION_DENIED"


def test_unknown_reason_cannot_be_constructed() -> None:
    with pytest.raises(ValueError, match="unknown reason"):
        Refusal("because")


def test_json_shape_is_mlflows() -> None:
    content_type, body = render(Refusal("body_too_large", "The limit is 5 bytes."), "rid", False)
    assert content_type == b"application/json"
    assert json.loads(body) == {
        "error_code": "RESOURCE_EXHAUSTED",
        "message": "The request body is too large. The limit is 5 bytes.",
        "reason": "body_too_large",
        "request_id": "rid",
    }


def test_html_is_escaped() -> None:
    _, body = render(Refusal("not_found", "<script>x</script>"), "<b>", True)
    assert b"<script>" not in body
    assert b"&lt;script&gt;" in body


def test_readme_lists_every_reason() -> None:
    """The README's error table is the reason table, row for row."""
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    listed = {}
    for line in rows:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[1].isdigit():
            listed[cells[0].strip("`")] = (int(cells[1]), cells[2].strip("`"), cells[3])
    expected = {r: (i.status, i.error_code, i.message) for r, i in REASONS.items()}
    assert listed == expected


def test_readme_says_which_reasons_are_never_sent() -> None:
    from pathlib import Path

    from guard.errors import CONCEALED

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Reasons never sent to clients", 1)[1].split("\n## ", 1)[0]
    listed = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert set(CONCEALED) <= listed


def test_concealed_reasons_are_sent_as_permission_denied() -> None:
    from guard.errors import CONCEALED, conceal

    for reason in CONCEALED:
        sent = conceal(Refusal(reason, "the truth"), "what was sent")
        assert sent.reason == "permission_denied" and "truth" not in sent.message
        assert sent.cause is not None and sent.cause.reason == reason
    other = Refusal("invalid_request_body", "x")
    assert conceal(other, "y") is other
