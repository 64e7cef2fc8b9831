from lfm2_train.tasks import extract_answer, make_problems, sft_conversations, verify


def test_problems_are_reproducible_and_correct():
    a, b = make_problems(50, seed=3), make_problems(50, seed=3)
    assert a == b
    assert a != make_problems(50, seed=4)
    for p in a:
        expr = p.solution.split(" =")[0]
        assert eval(expr) == p.answer  # noqa: S307 - our own generated digits and operator
        assert verify(p.solution, p.answer) == 1.0


def test_levels_restrict_difficulty():
    easy = make_problems(40, seed=0, levels=(0,))
    assert all(p.difficulty < 1 and "+" in p.question for p in easy)


def test_extract_answer_prefers_answer_tag():
    assert extract_answer("3 + 4 = 7. Answer: 7 and then 12") == 7
    assert extract_answer("it is 12, no 13") == 13
    assert extract_answer("-5") == -5
    assert extract_answer("no digits") is None
    assert verify("Answer: 8", 7) == 0.0


def test_sft_rows_are_chat_form():
    rows = sft_conversations(3, seed=1)
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    assert set(rows[0]) == {"messages", "answer", "difficulty"}
