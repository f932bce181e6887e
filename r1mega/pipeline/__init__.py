"""``r1mega-pipeline``: the stages of DeepSeek-R1 in order, with manifests, resume and a report."""
