import re,sys,collections
agg=collections.defaultdict(lambda:[0,0,0.0,0.0,0])
for line in open(sys.argv[1]):
    line=re.sub(r'\x1b\[[0-9;]*m','',line)
    if 'auto round' not in line: continue
    f=dict(re.findall(r'(\w+)=("[^"]*"|\S+)',line))
    k=(f['policy'],f['kind'])
    a=agg[k]; a[0]+=1; a[1]+=int(f['tokens']); a[2]+=float(f['ms']); a[3]+=float(f['verify_ms']); a[4]+=int(f['nodes'])
for k,(n,t,ms,v,nodes) in sorted(agg.items()):
    print(k,n,t,'round %.1f ms'%(ms/n),'verify %.1f ms'%(v/n),'nodes %.2f'%(nodes/n), 'tok/round %.2f'%(t/n))
