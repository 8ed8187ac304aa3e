-- Forgetting events (Toneva et al., 2019): training instances ranked by how often the model
-- forgot them: a forgetting event is a presentation (a step whose batch held the instance)
-- at which it was misclassified after being classified correctly at its previous one, read
-- from examples (the prediction in that step's forward pass). never_learned: never classified
-- correctly, ranked first (as if forgotten infinitely often); first_learned_step: the step it
-- was first classified correctly. Unforgettable instances (learned, never forgotten) are easy;
-- many forgetting events mark ambiguous or atypical instances, never learned ones often wrong
-- labels.
-- param: k (int64, default 20) instances
WITH seen AS (
    SELECT instance_id, label, step,
           CASE WHEN predicted = label THEN 1 ELSE 0 END AS correct,
           LAG(CASE WHEN predicted = label THEN 1 ELSE 0 END) OVER (
               PARTITION BY instance_id ORDER BY step
           ) AS previous
    FROM examples
),
counted AS (
    SELECT instance_id, MIN(label) AS label, COUNT(*) AS presentations,
           SUM(CASE WHEN previous = 1 AND correct = 0 THEN 1 ELSE 0 END) AS forgetting_events,
           SUM(CASE WHEN previous = 0 AND correct = 1 THEN 1 ELSE 0 END) AS learning_events,
           SUM(correct) AS times_correct,
           MIN(CASE WHEN correct = 1 THEN step END) AS first_learned_step,
           MAX(step) AS last_step
    FROM seen
    GROUP BY instance_id
),
ranked AS (
    SELECT c.*, CASE WHEN times_correct = 0 THEN 1 ELSE 0 END AS never_learned,
           ROW_NUMBER() OVER (
               ORDER BY CASE WHEN times_correct = 0 THEN 1 ELSE 0 END DESC,
                        forgetting_events DESC, instance_id ASC
           ) AS rank
    FROM counted c
)
SELECT r.rank, r.instance_id, r.label, r.never_learned, r.forgetting_events, r.learning_events,
       r.presentations, r.times_correct, r.first_learned_step,
       CASE WHEN e.predicted = e.label THEN 1 ELSE 0 END AS correct_at_end
FROM ranked r
JOIN examples e ON e.instance_id = r.instance_id AND e.step = r.last_step
WHERE r.rank <= $k
ORDER BY r.rank
