import re,sys,collections
agg=collections.defaultdict(lambda:[0,0,0.0,0.0])
for line in open(sys.argv[1]):
    line=re.sub(r'\x1b\[[0-9;]*m','',line)
    if 'auto round' not in line: continue
    f=dict(re.findall(r'(\w+)=("[^"]*"|\S+)',line))
    k=(f['policy'],f['kind'])
    a=agg[k]; a[0]+=1; a[1]+=int(f['tokens']); a[2]+=float(f['ms']); a[3]+=float(f['predicted_ms'])/1e3 and float(f['predicted_tokens'])/(float(f['predicted_ms'])/1e3)
for k,(n,t,ms,pr) in sorted(agg.items()):
    print(k,n,t,'%.1f tok/s'%(t/ms*1e3),'pred mean %.1f'%(pr/n))
