-- Top steps: per layer, the k training steps whose updates moved a probe's refinement most,
-- influence = (sum of dot over the step's records) / ||p||, signed, ranked by its absolute value.
-- In instance mode a step's records are its batch's instances; in batch mode the step's one
-- whole-batch record. label is the class of every record of the step, NULL when they differ.
-- param: probe (int64) the probe id
-- param: k (int64, default 10) steps per layer
WITH by_step AS (
    SELECT layer, step, MIN(epoch) AS epoch, SUM(dot) AS dot_sum, COUNT(*) AS records,
           MIN(label) AS min_label, MAX(label) AS max_label, COUNT(label) AS labelled
    FROM contributions
    WHERE probe_id = $probe AND step IS NOT NULL
    GROUP BY layer, step
),
ranked AS (
    SELECT s.layer, s.step, s.epoch, s.records,
           CASE WHEN s.min_label = s.max_label AND s.labelled = s.records THEN s.min_label END AS label,
           s.dot_sum / NULLIF(p.p_norm, 0) AS influence,
           ROW_NUMBER() OVER (
               PARTITION BY s.layer ORDER BY ABS(s.dot_sum) DESC, s.step ASC
           ) AS rank_in_layer
    FROM by_step s
    JOIN probes p ON p.layer = s.layer AND p.probe_id = $probe
)
SELECT layer, rank_in_layer, step, epoch, label, influence, records
FROM ranked
WHERE rank_in_layer <= $k
ORDER BY layer, rank_in_layer
