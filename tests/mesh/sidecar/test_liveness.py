"""The liveness rule (pure, table-tested on given times) and the window flag's parsing."""

from __future__ import annotations

import pytest

from mesh.sidecar.liveness import Hung, Liveness, window_from_text

#: (sent at, answered, settled at) per probe, as the sidecar's probe loop would report them
#: (1 s apart, a missed one settles on its 2 s deadline).
Probe = tuple[float, bool, float]


def verdicts(liveness: Liveness, probes: list[Probe]) -> list[Hung | None]:
    return [liveness.probed(sent, answered, now) for sent, answered, now in probes]


@pytest.mark.parametrize(
    ("window_s", "probes", "expected"),
    [
        # Answers all along: never.
        (4.0, [(0, True, 0.01), (1, True, 1.01), (2, True, 2.01)], [None, None, None]),
        # Silent from the probe sent at 1: 2 s, 5 s of silence: the second miss passes 4 s.
        (4.0, [(0, True, 0.0), (1, False, 3), (4, False, 6)], [None, None, Hung(5.0, 2)]),
        # An answer in between starts the silence over.
        (
            4.0,
            [(1, False, 3), (4, True, 4.1), (5, False, 7), (8, False, 10)],
            [None, None, None, Hung(5.0, 2)],
        ),
        # A slow answer (an error status, or one just inside its deadline) is an answer.
        (4.0, [(1, False, 3), (4, True, 5.9), (7, False, 9)], [None, None, None]),
        # One long miss passes the window, but one miss alone is never a verdict.
        (1.5, [(0, False, 2), (3, False, 5)], [None, Hung(5.0, 2)]),
        # The default 30 s: misses 3 s apart (1 s interval, 2 s deadline); the eleventh
        # settles 32 s after the first was sent.
        (
            30.0,
            [(1 + 3 * i, False, 3 + 3 * i) for i in range(11)],
            [None] * 10 + [Hung(32.0, 11)],
        ),
    ],
)
def test_a_worker_is_hung_once_silent_for_the_window_and_enough_misses(
    window_s: float, probes: list[Probe], expected: list[Hung | None]
) -> None:
    assert verdicts(Liveness(window_s), probes) == expected


def test_the_verdict_stands_while_the_silence_lasts() -> None:
    liveness = Liveness(2.0)
    assert verdicts(liveness, [(0, False, 2), (3, False, 5), (6, False, 8)]) == [
        None,
        Hung(5.0, 2),
        Hung(8.0, 3),
    ]


@pytest.mark.parametrize(("window_s", "min_failures"), [(0.0, 2), (-1.0, 2), (4.0, 0)])
def test_bad_settings_are_refused(window_s: float, min_failures: int) -> None:
    with pytest.raises(ValueError, match="liveness window"):
        Liveness(window_s, min_failures)


@pytest.mark.parametrize(("text", "expected"), [("30", 30.0), ("4.5", 4.5), ("0", 0.0)])
def test_window_flag_values(text: str, expected: float) -> None:
    assert window_from_text(text) == expected


@pytest.mark.parametrize("text", ["-1", "soon", "nan", "inf"])
def test_bad_window_flag_values_name_the_problem(text: str) -> None:
    with pytest.raises(ValueError, match="liveness window"):
        window_from_text(text)
