python manage.py kissmetrics_backfill signups
python manage.py kissmetrics_backfill --model shop.Order --event "Placed Order" \
    --time-field placed_at --identity-field user \
    --property Total=total --property Plan=plan --filter status=paid --since 2024-01-01
python manage.py kissmetrics_backfill --model shop.Subscription --set \
    --time-field started --identity-field email --property Plan=plan
