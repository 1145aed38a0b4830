"""Stage 1 of the recipe: Stack Exchange dumps -> preference and paired datasets.

Where things live: `dumps` (finding and streaming dump files), `store` (grouping answers
under questions on disk), `markdown` (HTML -> Markdown), `scoring` (`pm_score`), `pairs`
(pairing and the question-level split), `writer` (parquet shards, dataset card),
`options` (`PrepareOptions`), `parse` and `convert` (passes 1 and 2), `prepare` (the three
passes tied together, written atomically), `loading` (reading the result back),
`template` (the `Question: ... Answer: ...` text every stage shares).
"""
