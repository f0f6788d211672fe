import re,glob,statistics as st
rows={}
for f in sorted(glob.glob('bench/results/2026-12-01-claim-functions/an*-*.txt')):
    b=f.split('-')[-1][:-4]; t=open(f).read()
    if 'drain at concurrency 256' not in t.split('summary')[-1]: continue
    r={}
    r['proc']=float(re.search(r'processing:.*?\(([\d.]+)x',t).group(1))
    for c in ('16','100','256'):
        m=re.search(r'drain at concurrency +%s: as enqueued +[\d,]+ jobs/s \(([\d.]+)x 16-conn\); after VACUUM ANALYZE +[\d,]+ jobs/s \(([\d.]+)x'%c,t)
        r['c%s'%c]=float(m.group(1)); r['c%sA'%c]=float(m.group(2))
    r['p50']=float(re.search(r'latency: p50 ([\d.]+)',t).group(1)); r['p99']=float(re.search(r'p99 ([\d.]+)',t).group(1))
    rows.setdefault(b,[]).append(r)
for b,rs in rows.items():
    print(b,len(rs),' '.join('%s=%.2f(%s)'%(k,st.median([r[k] for r in rs]),'/'.join('%.2f'%r[k] for r in rs)) for k in rs[0]))
