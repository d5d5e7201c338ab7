"""The demo's closing summary (``demo.summarize``): short, readable lines."""

from mint_ray import demo

HEADLINE = ("| arm | n | unparseable | top1 | top10 | mrr |\n|---|---|---|---|---|---|\n"
            "| sft | 200 | 0 | 0.320 [0.255, 0.385] | 0.800 [0.745, 0.855] | 0.501 [0.447, 0.552] |\n")
PAIRED = ("| arm | vs | n | top1 diff | top10 diff | top1 only arm / only ref | McNemar p | top1 significant |\n"
          "|---|---|---|---|---|---|---|---|\n"
          "| orpo | sft | 200 | -0.030 [-0.100, +0.040] | +0.020 [-0.045, +0.085] | 22 / 28 | 0.48 | no |\n")


def result(answer: dict) -> dict:
    labels = [{"rank": i + 1, "label": f"Disease {i}", "id": f"OMIM:{i}"} for i in range(10)]
    return {
        "root": "/data", "tracking_uri": "sqlite:////data/mlflow.db",
        "champions": {"rare_disease": "models:/m@champion"},
        "timings": {"rare_disease compare": 384.2, "total": 651.0},
        "tasks": {"rare_disease": {
            "table": HEADLINE, "paired_table": PAIRED, "report_uri": "/data/report",
            "files": ["report.md", "accuracy.png"],
            "promotion": {"arm": "sft", "name": "mint-rare-disease-text", "version": "1", "promoted": True,
                          "reason": "no version holds the alias; top1 = 0.3200"}}},
        "requests": {"rare_disease": "a clinical note of 169 characters"},
        "answers": {"rare_disease": answer or {"labels": labels, "latency_ms": 374.1}},
    }


def test_the_summary_shows_the_tables_the_promotion_and_the_answer_in_short_lines() -> None:
    text = "\n".join(demo.summarize(result({})))
    lines = text.splitlines()
    assert "| total | 651 |" in text and HEADLINE.strip() in text and PAIRED.strip() in text
    assert ("promoted sft (best trained top-1) as mint-rare-disease-text v1 to @champion: no version holds "
            "the alias; top1 = 0.3200") in text
    served = lines.index("served models:/m@champion, asked a clinical note of 169 characters:")
    assert lines[served + 1] == "  1. Disease 0; 2. Disease 1; 3. Disease 2 (+7 more) in 374 ms"
    assert "open it: mlflow ui --backend-store-uri sqlite:////data/mlflow.db" in text
    # Every line but the tables fits a 120-column terminal.
    assert all(len(line) <= 120 for line in lines if not line.startswith("|")), [x for x in lines if len(x) > 120]


def test_a_failed_request_is_shown_as_the_server_sent_it() -> None:
    error = {"error": {"type": "model_unavailable", "message": "no replica"}, "status": 503}
    lines = demo.summarize(result(error))
    assert lines[lines.index("served models:/m@champion, asked a clinical note of 169 characters:") + 1] == \
        f"  {error}"
