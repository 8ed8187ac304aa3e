-- Layer summary: per layer, a probe's refinement norm ||p||, the number of attributed records,
-- the positive and negative mass of the records (sums of their positive / negative dots, over
-- ||p||^2), the share of records without a class (batch mode: batches of several classes; 0 in
-- instance mode and with class-pure batches), the residual's share, and the total share (1 for a
-- complete attribution). A record has a step; the residual pseudo-source is the row whose step is
-- NULL. (Telling them apart by instance_id would be wrong: batch-mode records have none.)
-- param: probe (int64) the probe id
WITH sums AS (
    SELECT layer,
           SUM(CASE WHEN step IS NOT NULL THEN 1 ELSE 0 END) AS records,
           SUM(CASE WHEN step IS NOT NULL AND dot > 0 THEN dot ELSE 0.0 END) AS positive,
           SUM(CASE WHEN step IS NOT NULL AND dot < 0 THEN dot ELSE 0.0 END) AS negative,
           SUM(CASE WHEN step IS NOT NULL AND label IS NULL THEN dot ELSE 0.0 END) AS mixed,
           SUM(CASE WHEN step IS NULL THEN dot ELSE 0.0 END) AS residual,
           SUM(dot) AS total
    FROM contributions
    WHERE probe_id = $probe
    GROUP BY layer
)
SELECT s.layer,
       p.p_norm,
       s.records,
       s.positive / NULLIF(p.p_norm * p.p_norm, 0) AS positive_share,
       s.negative / NULLIF(p.p_norm * p.p_norm, 0) AS negative_share,
       s.mixed / NULLIF(p.p_norm * p.p_norm, 0) AS mixed_batches_share,
       s.residual / NULLIF(p.p_norm * p.p_norm, 0) AS residual_share,
       s.total / NULLIF(p.p_norm * p.p_norm, 0) AS total_share
FROM sums s
JOIN probes p ON p.layer = s.layer AND p.probe_id = $probe
ORDER BY s.layer
