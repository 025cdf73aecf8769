import json,sys,glob
for d in sys.argv[1:]:
    try: j=json.load(open(d+'/bench.json'))
    except Exception as e: print(d,'missing'); continue
    rows={r['name']:r for r in j['rows']}
    best=max((r['tok_s'],n) for n,r in rows.items() if n not in('auto',))
    a=rows['auto']
    print(d, ' '.join('%s %.2f'%(n,r['tok_s']) for n,r in rows.items()), 'auto/best(%s) %.3f'%(best[1],a['tok_s']/best[0]), 'pol',a.get('policy_tokens'), 'tpf %.2f'%a['tokens_per_forward'], 'draft_s %.1f'%a['draft_s'])
