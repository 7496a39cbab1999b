"""The review service: a JSON API and a web page where reviewers confirm, correct or reject suggestions."""
