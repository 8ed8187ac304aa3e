-- Batch member influence (batch mode): per layer, the k training instances with the largest
-- influence on a probe when each batch's contribution is divided evenly among its members:
-- influence of instance j = sum over the steps j was in of (the step's dot / its batch size) /
-- ||p||. An even split is an assumption, not a measurement: a batch-mode record holds the whole
-- update of its batch, and the method column says so. With class-pure batches, class sums of it
-- are exact (class_shares); single instances are not. Instance-mode runs have no batches rows.
-- param: probe (int64) the probe id
-- param: k (int64, default 10) instances per layer
WITH step_dot AS (
    SELECT layer, step, SUM(dot) AS dot_sum
    FROM contributions
    WHERE probe_id = $probe AND step IS NOT NULL AND instance_id IS NULL
    GROUP BY layer, step
),
sizes AS (
    SELECT step, COUNT(*) AS members
    FROM batches
    GROUP BY step
),
shares AS (
    SELECT d.layer, b.instance_id, b.label,
           SUM(d.dot_sum / z.members) AS dot_share, COUNT(*) AS batches
    FROM step_dot d
    JOIN batches b ON b.step = d.step
    JOIN sizes z ON z.step = d.step
    GROUP BY d.layer, b.instance_id, b.label
),
ranked AS (
    SELECT s.layer, s.instance_id, s.label, s.batches,
           s.dot_share / NULLIF(p.p_norm, 0) AS influence,
           ROW_NUMBER() OVER (
               PARTITION BY s.layer ORDER BY s.dot_share DESC, s.instance_id ASC
           ) AS rank_in_layer
    FROM shares s
    JOIN probes p ON p.layer = s.layer AND p.probe_id = $probe
)
SELECT layer, rank_in_layer, instance_id, label, influence, batches,
       'even split of each batch''s contribution among its members' AS method
FROM ranked
WHERE rank_in_layer <= $k
ORDER BY layer, rank_in_layer
