-- Mislabel candidates: training instances ranked by score, the mean over training of their loss
-- (-log of the probability the model gave their label in each step's forward pass, read from
-- examples), highest first. A wrong label keeps a high loss for most of training whether or not
-- the model fits it in the end, so the same sign works for both; on the bundled digits with 10 %
-- of the training labels flipped this ranking finds them with a ROC AUC of 0.999 for a model
-- that does not fit them and 1.000 for one that memorises them (docs/benchmarks.md,
-- scripts/eval/mislabel.py). Evidence beside it: confidence and correctness (data_map), the
-- prediction and probability of the label at the instance's last presentation, and the
-- TracIn-style self-influence over all traced layers (tracin_self_influence; NULL in batch mode).
-- param: k (int64, default 20) instances
WITH dyn AS (
    SELECT instance_id, MIN(label) AS label, AVG(loss) AS score, AVG(p_label) AS confidence,
           AVG(CASE WHEN predicted = label THEN 1.0 ELSE 0.0 END) AS correctness,
           MAX(step) AS last_step, COUNT(*) AS presentations
    FROM examples
    GROUP BY instance_id
),
ranked AS (
    SELECT d.*, ROW_NUMBER() OVER (ORDER BY score DESC, instance_id ASC) AS rank
    FROM dyn d
),
top AS (
    SELECT * FROM ranked WHERE rank <= $k
),
tracin AS (
    SELECT u.instance_id,
           SUM(CAST(u.update_norm AS DOUBLE) * CAST(u.update_norm AS DOUBLE)) AS tracin
    FROM updates u
    JOIN top t ON t.instance_id = u.instance_id
    GROUP BY u.instance_id
)
SELECT t.rank, t.instance_id, t.label, e.predicted AS predicted_at_end, t.score, t.confidence,
       t.correctness, e.p_label AS p_label_at_end, tr.tracin, t.presentations
FROM top t
JOIN examples e ON e.instance_id = t.instance_id AND e.step = t.last_step
LEFT JOIN tracin tr ON tr.instance_id = t.instance_id
ORDER BY t.rank
