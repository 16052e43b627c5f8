"""What a study keeps and shows: trial records, exports, summaries, plots, the dashboard, predictions."""
