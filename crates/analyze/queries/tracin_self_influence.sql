-- TracIn self-influence: training instances ranked by how much their own updates moved the
-- weights, tracin = sum over the instance's records of ||Delta W||_F^2 (update_norm squared;
-- the learning rate is inside it), per traced layer and over all of them (layer 'all'). A
-- gradient-norm score: large for instances the model kept being pushed by, wrong labels among
-- them. Read from updates alone: no probes, no attribution. Instance mode only (batch-mode
-- records belong to no one instance).
-- param: k (int64, default 10) instances per layer
WITH per_layer AS (
    SELECT layer, instance_id, MIN(label) AS label,
           SUM(CAST(update_norm AS DOUBLE) * CAST(update_norm AS DOUBLE)) AS tracin,
           COUNT(*) AS records
    FROM updates
    WHERE instance_id IS NOT NULL
    GROUP BY layer, instance_id
),
scores AS (
    SELECT layer, instance_id, label, tracin, records FROM per_layer
    UNION ALL
    SELECT 'all' AS layer, instance_id, MIN(label) AS label, SUM(tracin) AS tracin,
           SUM(records) AS records
    FROM per_layer
    GROUP BY instance_id
),
ranked AS (
    SELECT layer, instance_id, label, tracin, records,
           ROW_NUMBER() OVER (PARTITION BY layer ORDER BY tracin DESC, instance_id ASC) AS rank_in_layer
    FROM scores
)
SELECT layer, rank_in_layer, instance_id, label, tracin, records
FROM ranked
WHERE rank_in_layer <= $k
ORDER BY layer, rank_in_layer
